"""Learning-rate schedules composed like T5X's `utils.create_learning_rate_scheduler`.

`factors` is a '*'-separated product of:
  constant                base_learning_rate
  linear_warmup           min(1, step / warmup_steps)
  rsqrt_decay             1 / sqrt(max(step, warmup_steps))
  rsqrt_normalized_decay  sqrt(warmup_steps) / sqrt(max(step, warmup_steps))

T5.1.1 pre-training (and alpha-uptraining) uses 'constant * rsqrt_decay' with base 1.0 and
10,000 warmup steps (0.01 for the first 10k steps, then 1/sqrt(step)); fine-tuning uses
'constant' with base 0.001. `step` is the global step, so an uptraining run restored at step
1,000,000 continues the pre-training schedule.
"""
from typing import Callable

import gin
import jax
import jax.numpy as jnp

from gqa_flax import errors

_FACTORS = ("constant", "linear_warmup", "rsqrt_decay", "rsqrt_normalized_decay")


@gin.configurable
def create_learning_rate_scheduler(factors: str = "constant * linear_warmup * rsqrt_decay",
                                   base_learning_rate: float = 0.5, warmup_steps: int = 1000,
                                   step_offset: int = 0, min_learning_rate: float = 1e-8
                                   ) -> Callable[[jax.Array], jax.Array]:
  """step (int scalar) -> learning rate (float32 scalar)."""
  names = [name.strip() for name in factors.split("*")]
  unknown = [name for name in names if name not in _FACTORS]
  if unknown:
    raise errors.UserError(f"unknown learning-rate factor(s) {unknown} in {factors!r}; "
                           f"use a '*' product of {', '.join(_FACTORS)}")

  def step_fn(step):
    step = jnp.maximum(0, jnp.asarray(step, jnp.float32) - step_offset)
    rate = jnp.float32(1.0)
    for name in names:
      if name == "constant":
        rate *= base_learning_rate
      elif name == "linear_warmup":
        rate *= jnp.minimum(1.0, step / warmup_steps)
      elif name == "rsqrt_decay":
        rate /= jnp.sqrt(jnp.maximum(step, warmup_steps))
      else:
        rate *= jnp.sqrt(warmup_steps) / jnp.sqrt(jnp.maximum(step, warmup_steps))
    return jnp.maximum(rate, min_learning_rate).astype(jnp.float32)

  return step_fn
