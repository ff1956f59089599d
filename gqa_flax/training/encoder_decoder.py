"""`EncoderDecoderModel`: the T5 network with its loss (T5X `models.py`); decoding: predictor.py.

Gin binds it like T5X's `models.EncoderDecoderModel`: the network config, z_loss,
label_smoothing and loss_normalizing_factor. Batches are T5X's feature-converter output:
encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights
[batch, length] int32 and, when packed, encoder/decoder segment_ids and positions.
"""
import dataclasses
from typing import Any, Dict, Tuple, Union

import gin
import jax
import jax.numpy as jnp

from gqa_flax.models import T5Config, Transformer
from gqa_flax.training import losses

Batch = Dict[str, jax.Array]
_MODEL_INPUTS = ("encoder_input_tokens", "decoder_input_tokens", "decoder_target_tokens",
                 "encoder_segment_ids", "decoder_segment_ids", "encoder_positions",
                 "decoder_positions")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class EncoderDecoderModel:
  config: T5Config
  z_loss: float = 1e-4
  label_smoothing: float = 0.0
  loss_normalizing_factor: Union[None, float, str] = None

  @property
  def module(self) -> Transformer:
    return Transformer(self.config)

  def init(self, rng: jax.Array, input_shapes: Dict[str, Tuple[int, ...]]) -> Any:
    """LogicallyPartitioned float32 params for batches of `input_shapes` (works under eval_shape)."""
    dummy = {name: jnp.ones(input_shapes[name], jnp.int32)
             for name in ("encoder_input_tokens", "decoder_input_tokens")}
    return self.module.init(rng, **dummy)["params"]

  def loss_fn(self, params: Any, batch: Batch, dropout_rng: Union[jax.Array, None]
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """(loss, metrics) of a batch; dropout is on when `dropout_rng` is given."""
    inputs = {name: batch[name] for name in _MODEL_INPUTS if name in batch}
    logits = self.module.apply({"params": params}, **inputs, enable_dropout=dropout_rng is not None,
                               rngs=None if dropout_rng is None else {"dropout": dropout_rng})
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights")
    loss, z_loss, weight_sum = losses.compute_weighted_cross_entropy(
        logits, targets, weights, self.label_smoothing, self.z_loss, self.loss_normalizing_factor)
    if weights is None:
      weights = jnp.ones(targets.shape, jnp.float32)
    correct = (jnp.argmax(logits, -1) == targets) * weights
    cross_entropy, _, _ = losses.compute_weighted_cross_entropy(logits, targets, weights, 0.0, 0.0)
    metrics = {"loss": loss, "z_loss": z_loss, "num_target_tokens": weight_sum,
               "cross_ent_loss_per_target_token": cross_entropy / jnp.maximum(weight_sum, 1.0),
               "accuracy": jnp.sum(correct) / jnp.maximum(weight_sum, 1.0)}
    return loss, metrics

  def per_example_loss(self, params: Any, batch: Batch) -> Tuple[jax.Array, jax.Array]:
    """([batch] mean cross entropy per target token of each example, [batch] its number of
    target tokens): teacher-forced, without dropout, z-loss or label smoothing; an example
    without target tokens (padding) has loss 0 and 0 tokens."""
    inputs = {name: batch[name] for name in _MODEL_INPUTS if name in batch}
    logits = self.module.apply({"params": params}, **inputs, enable_dropout=False)
    targets = batch["decoder_target_tokens"]
    weights = batch.get("decoder_loss_weights", jnp.ones(targets.shape, jnp.float32))
    weights = weights.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    cross_entropy = jax.nn.logsumexp(logits, axis=-1) - target_logits  # [batch, length]
    tokens = jnp.sum(weights, axis=-1)
    return jnp.sum(cross_entropy * weights, axis=-1) / jnp.maximum(tokens, 1.0), tokens
