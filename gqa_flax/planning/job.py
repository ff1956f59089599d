"""What `gqa-plan` plans, read from the run's gin config (configs/plan/plan.gin binds it)."""
import dataclasses
from typing import Callable, Dict

import gin
import jax
import optax

from gqa_flax.training.encoder_decoder import EncoderDecoderModel


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Job:
  """The run's model, optimizer, schedule, feature lengths, global batch and model parallelism."""
  model: EncoderDecoderModel
  optimizer: optax.GradientTransformation
  learning_rate_fn: Callable[[jax.Array], jax.Array]
  task_feature_lengths: Dict[str, int]
  batch_size: int
  num_partitions: int
