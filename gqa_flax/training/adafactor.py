"""T5X's Adafactor (t5x/adafactor.py) from optax's building blocks.

optax's `scale_by_factored_rms`, `clip_by_block_rms` and `scale_by_param_block_rms` chained as
`optax.adafactor` chains them give T5X's update direction exactly for the rank <= 2 parameters
of T5.1.1:

  * factored second moments over the two largest dims when the smaller one is >=
    `min_dim_size_to_factor` (T5X's logical factor rules -- 'embed' -> ROW; 'vocab', 'mlp',
    'heads', 'kv', 'joined_kv' -> COLUMN -- are ignored by T5X for rank <= 2 parameters, which
    fall back to this same heuristic: `Adafactor._parse_rule(fallback_to_heuristics=True)`);
  * beta2_t = 1 - (t + 1)^-decay_rate, epsilon1 added to grad^2;
  * update clipped to block RMS `clipping_threshold`;
  * scaled by max(RMS(param), epsilon2) (`multiply_by_parameter_scale`), no momentum.

The learning rate is NOT inside the transformation: optax's schedule would count the
optimizer's own steps, which restart with fresh optimizer state, while T5X's schedules follow
the global step (uptraining continues at step 1,000,000). The trainer multiplies the update by
`learning_rate_fn(global_step)`. The second-moment decay counts the optimizer's own steps, which
is T5X's `step_offset` set to the restored step (fresh accumulators start at beta2 = 0).
"""
from typing import Optional, Sequence, Tuple

import gin
import numpy as np
import optax


@gin.configurable
def adafactor(decay_rate: float = 0.8, clipping_threshold: Optional[float] = 1.0,
              multiply_by_parameter_scale: bool = True, min_dim_size_to_factor: int = 128,
              epsilon1: float = 1e-30, epsilon2: float = 1e-3,
              factored: bool = True) -> optax.GradientTransformation:
  """T5X Adafactor's update direction (descent sign included, learning rate 1, beta1=None)."""
  chain = [optax.scale_by_factored_rms(factored, decay_rate, 0, min_dim_size_to_factor, epsilon1)]
  if clipping_threshold is not None:
    chain.append(optax.clip_by_block_rms(clipping_threshold))
  if multiply_by_parameter_scale:
    chain.append(optax.scale_by_param_block_rms(epsilon2))
  chain.append(optax.scale(-1.0))
  return optax.chain(*chain)


def factored_dims(shape: Sequence[int], min_dim_size_to_factor: int = 128
                  ) -> Optional[Tuple[int, int]]:
  """(d1, d0): T5X's heuristic factored dims; v_row drops d0, v_col drops d1; None if unfactored."""
  if len(shape) < 2:
    return None
  order = np.argsort(shape)
  if shape[order[-2]] < min_dim_size_to_factor:
    return None
  return int(order[-2]), int(order[-1])
