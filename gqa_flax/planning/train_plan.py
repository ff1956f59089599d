"""Compile the training step (the trainer's, with the run's sharding) for a TPU slice."""
import logging
from typing import Dict

import jax
import jax.numpy as jnp

from gqa_flax.planning.compiled import CompiledStep, compile_step
from gqa_flax.planning.job import Job
from gqa_flax.training import trainer
from gqa_flax.training.partitioning import Partitioner

# T5X's packed EncDecFeatureConverter output: (feature, 'inputs' or 'targets' length).
_FEATURES = (("encoder_input_tokens", "inputs"), ("encoder_segment_ids", "inputs"),
             ("encoder_positions", "inputs"), ("decoder_input_tokens", "targets"),
             ("decoder_target_tokens", "targets"), ("decoder_loss_weights", "targets"),
             ("decoder_segment_ids", "targets"), ("decoder_positions", "targets"))


def abstract_batch(lengths: Dict[str, int], batch_size: int, sharding
                   ) -> Dict[str, jax.ShapeDtypeStruct]:
  """Packed int32 features [batch_size, length] with `sharding` (over 'data')."""
  return {name: jax.ShapeDtypeStruct((batch_size, lengths[kind]), jnp.int32, sharding=sharding)
          for name, kind in _FEATURES}


def abstract_state(job: Job, partitioner: Partitioner):
  """(TrainState of ShapeDtypeStructs with shardings, its shardings); allocates nothing."""
  shapes = {"encoder_input_tokens": (1, job.task_feature_lengths["inputs"]),
            "decoder_input_tokens": (1, job.task_feature_lengths["targets"])}
  boxed = trainer.abstract_params(job.model, shapes)
  shardings = trainer.state_shardings(partitioner, job.optimizer, boxed)
  return trainer.abstract_train_state(job.optimizer, boxed, shardings), shardings


def compile_train_step(job: Job, partitioner: Partitioner, batch_size: int) -> CompiledStep:
  """The trainer's jitted train step at global `batch_size`, compiled for the partitioner's mesh."""
  partitioner.check_batch_size(batch_size)
  state, shardings = abstract_state(job, partitioner)
  step = trainer.make_train_step(job.model, job.optimizer, job.learning_rate_fn)
  batch = abstract_batch(job.task_feature_lengths, batch_size, partitioner.batch_sharding())
  compiled = compile_step(trainer.jit_train_step(partitioner, step, shardings), state, batch)
  logging.info("train step at global batch %d: %s", batch_size,
               compiled.oom or f"{compiled.total_bytes / 2**30:.1f} GiB per device")
  return compiled
