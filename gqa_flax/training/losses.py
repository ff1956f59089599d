"""T5X's cross entropy with z-loss and label smoothing (t5x/losses.py, t5x/models.py)."""
from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp

from gqa_flax import errors

# T5X `losses.SpecialLossNormalizingFactor.NUM_REAL_TARGET_TOKENS`, by name as in gin files.
NUM_REAL_TARGET_TOKENS = "NUM_REAL_TARGET_TOKENS"


def compute_weighted_cross_entropy(
    logits: jax.Array, targets: jax.Array, weights: Optional[jax.Array] = None,
    label_smoothing: float = 0.0, z_loss: float = 1e-4,
    loss_normalizing_factor: Union[None, float, str] = None
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Summed loss over target tokens, as T5X computes it.

  Args:
    logits: [batch, length, vocab] float32.
    targets: [batch, length] int token ids.
    weights: [batch, length] (decoder_loss_weights); None weighs every token 1.
    label_smoothing: mass spread uniformly over the vocab-1 wrong tokens.
    z_loss: coefficient of log(Z)^2, which keeps the softmax normaliser near 1.
    loss_normalizing_factor: None (sum), a number to divide by, or 'NUM_REAL_TARGET_TOKENS'.

  Returns:
    (loss, z_loss_part, weight_sum): scalars; loss includes z_loss_part and the
    label-smoothing constant is removed so a perfect prediction scores 0.
  """
  vocab_size = logits.shape[-1]
  confidence = 1.0 - label_smoothing
  low_confidence = label_smoothing / (vocab_size - 1)
  normalizing_constant = -(confidence * jnp.log(confidence)
                           + (vocab_size - 1) * low_confidence * jnp.log(low_confidence + 1e-20))
  soft_targets = jax.nn.one_hot(targets, vocab_size) * (confidence - low_confidence) + low_confidence
  log_z = jax.nn.logsumexp(logits, axis=-1)
  cross_entropy = log_z - jnp.sum(soft_targets * logits, axis=-1) - normalizing_constant
  z_loss_part = z_loss * jnp.square(log_z)
  if weights is None:
    weights = jnp.ones(targets.shape, jnp.float32)
  weights = weights.astype(jnp.float32)
  weight_sum = jnp.sum(weights)
  loss = jnp.sum((cross_entropy + z_loss_part) * weights)
  z_loss_part = jnp.sum(z_loss_part * weights)
  if loss_normalizing_factor == NUM_REAL_TARGET_TOKENS:
    loss_normalizing_factor = weight_sum
  elif isinstance(loss_normalizing_factor, str):
    raise errors.UserError(
        f"loss_normalizing_factor={loss_normalizing_factor!r}: use None, a number "
        f"or {NUM_REAL_TARGET_TOKENS!r}")
  if loss_normalizing_factor is not None:
    loss /= loss_normalizing_factor
    z_loss_part /= loss_normalizing_factor
  return loss, z_loss_part, weight_sum
