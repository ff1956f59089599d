"""T5.1.1 encoder-decoder (T5X `examples/t5/network.py`) with GQA in the decoder.

The parameter tree is T5X's, name for name (`token_embedder`, `encoder/layers_{i}/attention`,
`decoder/layers_{i}/{self_attention,encoder_decoder_attention}`, `decoder/logits_dense`, ...),
so T5X checkpoints load without renaming. The encoder's attention is always multi-head.
"""
from typing import Callable, Optional, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from gqa_flax.models import layers
from gqa_flax.models.attention import MultiHeadDotProductAttention, mask_to_bias
from gqa_flax.models.config import T5Config


def _attention_mask(query_tokens: jax.Array, key_tokens: jax.Array,
                    query_segment_ids: Optional[jax.Array] = None,
                    key_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """[batch, 1, q_len, k_len] bool: both positions are real tokens of the same segment."""
  mask = (query_tokens > 0)[:, None, :, None] & (key_tokens > 0)[:, None, None, :]
  if query_segment_ids is not None:
    mask &= query_segment_ids[:, None, :, None] == key_segment_ids[:, None, None, :]
  return mask


def _dropout(config: T5Config) -> nn.Dropout:
  return nn.Dropout(config.dropout_rate, broadcast_dims=(-2,))


class EncoderLayer(nn.Module):
  """Pre-norm self-attention (multi-head) then gated MLP, each with a residual."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, bias: jax.Array, deterministic: bool) -> jax.Array:
    cfg = self.config
    y = layers.LayerNorm(dtype=cfg.dtype, name="pre_attention_layer_norm")(x)
    y = MultiHeadDotProductAttention(cfg.num_heads, cfg.num_heads, cfg.head_dim,
                                     dropout_rate=cfg.dropout_rate, dtype=cfg.dtype,
                                     name="attention")(y, y, bias, deterministic)
    x = x + _dropout(cfg)(y, deterministic=deterministic)
    y = layers.LayerNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
    y = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype,
                        name="mlp")(y, deterministic)
    return x + _dropout(cfg)(y, deterministic=deterministic)


class DecoderLayer(nn.Module):
  """Self-attention (num_kv_heads), cross-attention (cross_num_kv_heads), gated MLP."""
  config: T5Config

  @nn.compact
  def __call__(self, x: jax.Array, encoded: jax.Array, self_bias: jax.Array,
               cross_bias: jax.Array, deterministic: bool, decode: bool = False,
               decode_position: Optional[jax.Array] = None,
               max_decode_length: Optional[int] = None) -> jax.Array:
    cfg = self.config
    attention = lambda kv_heads, cross, name: MultiHeadDotProductAttention(
        cfg.num_heads, kv_heads, cfg.head_dim, is_cross_attention=cross,
        dropout_rate=cfg.dropout_rate, dtype=cfg.dtype, name=name)
    y = layers.LayerNorm(dtype=cfg.dtype, name="pre_self_attention_layer_norm")(x)
    y = attention(cfg.num_kv_heads, False, "self_attention")(
        y, y, self_bias, deterministic, decode, decode_position, max_decode_length)
    x = x + _dropout(cfg)(y, deterministic=deterministic)
    y = layers.LayerNorm(dtype=cfg.dtype, name="pre_cross_attention_layer_norm")(x)
    y = attention(cfg.cross_num_kv_heads, True, "encoder_decoder_attention")(
        y, encoded, cross_bias, deterministic, decode)
    x = x + _dropout(cfg)(y, deterministic=deterministic)
    y = layers.LayerNorm(dtype=cfg.dtype, name="pre_mlp_layer_norm")(x)
    y = layers.MlpBlock(cfg.mlp_dim, cfg.mlp_activations, cfg.dropout_rate, cfg.dtype,
                        name="mlp")(y, deterministic)
    return x + _dropout(cfg)(y, deterministic=deterministic)


def relative_position_biases(config: T5Config, bidirectional: bool
                             ) -> layers.RelativePositionBiases:
  """A stack's bias table (`relpos_bias`): bidirectional in the encoder, causal in the decoder."""
  return layers.RelativePositionBiases(config.num_heads, config.relative_attention_num_buckets,
                                       config.relative_attention_max_distance, bidirectional,
                                       name="relpos_bias")


RelativePositionBias = Callable[[jax.Array, jax.Array], jax.Array]


def encoder_bias(relpos: RelativePositionBias, encoder_input_tokens: jax.Array,
                 encoder_segment_ids: Optional[jax.Array] = None) -> jax.Array:
  """[batch, heads, inputs_len, inputs_len]: the encoder's attention bias, relative positions
  (`relpos(query_positions, key_positions)`) plus padding and segment masking."""
  positions = jnp.arange(encoder_input_tokens.shape[1])
  mask = _attention_mask(encoder_input_tokens, encoder_input_tokens,
                         encoder_segment_ids, encoder_segment_ids)
  return relpos(positions, positions) + mask_to_bias(mask)


def teacher_forced_biases(relpos: RelativePositionBias, encoder_input_tokens: jax.Array,
                          decoder_input_tokens: jax.Array,
                          decoder_target_tokens: Optional[jax.Array] = None,
                          encoder_segment_ids: Optional[jax.Array] = None,
                          decoder_segment_ids: Optional[jax.Array] = None
                          ) -> Tuple[jax.Array, jax.Array]:
  """The teacher-forced decoder's self-attention bias [batch, heads, q_len, q_len] (relative
  positions, causal, padding, segments) and cross-attention bias [batch, 1, q_len, inputs_len]."""
  # Without targets every position is real (decoder input 0 is BOS, not padding).
  targets = (jnp.ones_like(decoder_input_tokens) if decoder_target_tokens is None
             else decoder_target_tokens)
  positions = jnp.arange(decoder_input_tokens.shape[1])
  causal = positions[None, :] <= positions[:, None]
  self_mask = _attention_mask(targets, targets, decoder_segment_ids, decoder_segment_ids)
  self_bias = relpos(positions, positions) + mask_to_bias(self_mask & causal)
  cross_bias = mask_to_bias(_attention_mask(targets, encoder_input_tokens,
                                            decoder_segment_ids, encoder_segment_ids))
  return self_bias, cross_bias


class Encoder(nn.Module):
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoder_input_tokens: jax.Array,
               encoder_segment_ids: Optional[jax.Array] = None,
               deterministic: bool = True) -> jax.Array:
    """encoder_input_tokens [batch, inputs_len] -> encoded [batch, inputs_len, emb]."""
    cfg = self.config
    bias = encoder_bias(relative_position_biases(cfg, bidirectional=True), encoder_input_tokens,
                        encoder_segment_ids)
    x = self.shared_embedding(encoder_input_tokens).astype(cfg.dtype)
    x = _dropout(cfg)(x, deterministic=deterministic)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f"layers_{i}")(x, bias, deterministic)
    x = layers.LayerNorm(dtype=cfg.dtype, name="encoder_norm")(x)
    return _dropout(cfg)(x, deterministic=deterministic)


class Decoder(nn.Module):
  """Teacher-forced (causal mask over the targets) or one step at a time from a cache.

  In decode mode the stack keeps `cache/cache_index`, the absolute position of the next
  token; it places the new K/V in each self-attention cache and selects the relative
  position bias row of that position.
  """
  config: T5Config
  shared_embedding: nn.Module

  @nn.compact
  def __call__(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
               decoder_input_tokens: jax.Array, decoder_target_tokens: Optional[jax.Array] = None,
               encoder_segment_ids: Optional[jax.Array] = None,
               decoder_segment_ids: Optional[jax.Array] = None,
               deterministic: bool = True, decode: bool = False,
               max_decode_length: Optional[int] = None) -> jax.Array:
    """decoder_input_tokens [batch, q_len] -> logits [batch, q_len, vocab] (float32)."""
    cfg = self.config
    q_len = decoder_input_tokens.shape[1]
    relpos = relative_position_biases(cfg, bidirectional=False)
    if decode:
      if max_decode_length is None:
        raise ValueError("decode=True needs max_decode_length (the self-attention cache size)")
      is_initialized = self.has_variable("cache", "cache_index")
      index = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
      position = index.value
      query_positions = position + jnp.arange(q_len)
      key_positions = jnp.arange(max_decode_length)
      causal = key_positions[None, :] <= query_positions[:, None]
      self_bias = relpos(query_positions, key_positions) + mask_to_bias(causal)[None, None]
      cross_mask = jnp.broadcast_to(encoder_input_tokens > 0, (q_len,) + encoder_input_tokens.shape)
      cross_bias = mask_to_bias(cross_mask.transpose(1, 0, 2)[:, None])
      if is_initialized:
        index.value = position + q_len
    else:
      self_bias, cross_bias = teacher_forced_biases(
          relpos, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
          encoder_segment_ids, decoder_segment_ids)
      position = None

    x = self.shared_embedding(decoder_input_tokens).astype(cfg.dtype)
    x = _dropout(cfg)(x, deterministic=deterministic)
    for i in range(cfg.num_decoder_layers):
      x = DecoderLayer(cfg, name=f"layers_{i}")(x, encoded, self_bias, cross_bias, deterministic,
                                                decode, position, max_decode_length)
    x = layers.LayerNorm(dtype=cfg.dtype, name="decoder_norm")(x)
    x = _dropout(cfg)(x, deterministic=deterministic)
    if cfg.logits_via_embedding:
      return self.shared_embedding.attend(x) / jnp.sqrt(x.shape[-1])
    return layers.DenseGeneral(cfg.vocab_size, ("embed", "vocab"), dtype=jnp.float32,
                               name="logits_dense")(x)


class Transformer(nn.Module):
  """T5.1.1 encoder-decoder, called as T5X calls its network.

  `apply({'params': p}, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
  enable_dropout=False)` -> logits [batch, targets_len, vocab]; `encode` and `decode`
  (with `decode=True` and the 'cache' collection mutable) serve inference.
  """
  config: T5Config

  def setup(self):
    cfg = self.config
    self.token_embedder = layers.Embed(cfg.vocab_size, cfg.emb_dim, dtype=cfg.dtype)
    self.encoder = Encoder(cfg, self.token_embedder)
    self.decoder = Decoder(cfg, self.token_embedder)

  def encode(self, encoder_input_tokens: jax.Array, encoder_segment_ids: Optional[jax.Array] = None,
             enable_dropout: bool = False) -> jax.Array:
    """[batch, inputs_len] int -> [batch, inputs_len, emb]."""
    return self.encoder(encoder_input_tokens, encoder_segment_ids, not enable_dropout)

  def decode(self, encoded: jax.Array, encoder_input_tokens: jax.Array,
             decoder_input_tokens: jax.Array, decoder_target_tokens: Optional[jax.Array] = None,
             encoder_segment_ids: Optional[jax.Array] = None,
             decoder_segment_ids: Optional[jax.Array] = None, enable_dropout: bool = False,
             decode: bool = False, max_decode_length: Optional[int] = None) -> jax.Array:
    """-> logits [batch, q_len, vocab] float32. With decode=True, q_len is the step's tokens."""
    return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                        encoder_segment_ids, decoder_segment_ids, not enable_dropout, decode,
                        max_decode_length)

  def __call__(self, encoder_input_tokens: jax.Array, decoder_input_tokens: jax.Array,
               decoder_target_tokens: Optional[jax.Array] = None,
               encoder_segment_ids: Optional[jax.Array] = None,
               decoder_segment_ids: Optional[jax.Array] = None,
               encoder_positions: Optional[jax.Array] = None,
               decoder_positions: Optional[jax.Array] = None,
               enable_dropout: bool = False) -> jax.Array:
    """Teacher-forced logits [batch, targets_len, vocab] (float32).

    `*_positions` are accepted for T5X compatibility; T5.1.1's relative position bias
    does not use them.
    """
    del encoder_positions, decoder_positions
    encoded = self.encode(encoder_input_tokens, encoder_segment_ids, enable_dropout)
    return self.decode(encoded, encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
                       encoder_segment_ids, decoder_segment_ids, enable_dropout)
