"""Grouped-query attention: one code path for MHA (G = H), GQA-G and MQA (G = 1).

Query head h uses key/value head h // (H / G): the H query heads are split into G
contiguous groups, exactly as `jax.nn.dot_product_attention`, PyTorch SDPA `enable_gqa`
and the checkpoint converter (`gqa_flax.checkpoints.convert`) group them. Keys and values
are never repeated to H heads: queries are reshaped to `[batch, q_len, kv_heads, group,
head_dim]` and contracted against heads-major `[batch, kv_heads, kv_len, head_dim]`, the
layout of the decode caches, so a decode step reads each cache once, contiguously, as a
batched matrix product (no per-step transpose of the cache).
"""
from typing import Optional

import jax
import jax.numpy as jnp
from flax import linen as nn

from gqa_flax.models import layers

NEG_INF = -1e10  # T5X's masking value.


def mask_to_bias(mask: jax.Array) -> jax.Array:
  """A {0,1} (or bool) mask -> additive float32 bias: 0 where attended, -1e10 elsewhere."""
  return jnp.where(mask, 0.0, NEG_INF).astype(jnp.float32)


def heads_major(x: jax.Array) -> jax.Array:
  """[batch, len, heads, head_dim] -> [batch, heads, len, head_dim]."""
  return x.transpose(0, 2, 1, 3)


def grouped_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                      bias: Optional[jax.Array] = None, dropout: Optional[nn.Module] = None,
                      deterministic: bool = True) -> jax.Array:
  """Softmax attention with `kv_heads` dividing `heads`; no 1/sqrt(head_dim) scaling.

  Args:
    query: [batch, q_len, heads, head_dim].
    key, value: heads-major [batch, kv_heads, kv_len, head_dim].
    bias: additive float bias broadcastable to [batch, heads, q_len, kv_len]; its head
      axis has size `heads` (per query head, e.g. relative position bias) or 1.
    dropout: applied to the attention weights (T5X broadcasts it over queries).
  Returns:
    [batch, q_len, heads, head_dim] in the query's dtype.
  """
  batch, q_len, heads, head_dim = query.shape
  kv_heads = key.shape[1]
  group = heads // kv_heads
  query = query.reshape(batch, q_len, kv_heads, group, head_dim)
  logits = jnp.einsum("bqkgd,bktd->bkgqt", query, key,
                      preferred_element_type=jnp.float32)  # [b, kv_heads, group, q, t]
  if bias is not None:
    bias = bias.reshape(bias.shape[0], -1, 1 if bias.shape[1] == 1 else group, *bias.shape[2:])
    logits = logits + bias
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    weights = dropout(weights, deterministic=deterministic)
  out = jnp.einsum("bkgqt,bktd->bkgqd", weights.astype(value.dtype), value)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, heads, head_dim)


def grouped_dot_product_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                                  bias: Optional[jax.Array] = None,
                                  dropout: Optional[nn.Module] = None,
                                  deterministic: bool = True) -> jax.Array:
  """`grouped_attention` with key, value [batch, kv_len, kv_heads, head_dim]."""
  return grouped_attention(query, heads_major(key), heads_major(value), bias, dropout,
                           deterministic)


class MultiHeadDotProductAttention(nn.Module):
  """T5X's attention layer with `num_kv_heads` key/value heads.

  Params: `query/kernel [emb, heads*head_dim]`, `key/kernel` and `value/kernel
  [emb, kv_heads*head_dim]`, `out/kernel [heads*head_dim, emb]`. The query initializer
  folds in 1/sqrt(head_dim), so none is applied at run time.

  Decoding caches (collection 'cache'):
    self-attention: `cached_key`, `cached_value` [batch, kv_heads, max_decode_length,
      head_dim] ([batch, max_decode_length, head_dim] for MQA), written in place at the
      decode position each step;
    cross-attention (`is_cross_attention`): `cached_key`, `cached_value`
      [batch, kv_heads, inputs_len, head_dim], projected from the encoder output once, at
      the call that creates the cache, then reused at every step.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  is_cross_attention: bool = False
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  def _projection(self, heads: int, name: str, kernel_init) -> layers.DenseGeneral:
    return layers.DenseGeneral((heads, self.head_dim), ("embed", "joined_kv"),
                               kernel_init=kernel_init, dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: jax.Array, bias: Optional[jax.Array],
               deterministic: bool = True, decode: bool = False,
               decode_position: Optional[jax.Array] = None,
               max_decode_length: Optional[int] = None) -> jax.Array:
    """inputs_q [batch, q_len, emb], inputs_kv [batch, kv_len, emb] -> [batch, q_len, emb].

    In decode mode the bias must already cover the cached key positions.
    """
    kv_init = nn.initializers.variance_scaling(1.0, "fan_in", "normal")
    query_init = lambda *args: kv_init(*args) / jnp.sqrt(self.head_dim).astype(args[-1])
    query = self._projection(self.num_heads, "query", query_init)(inputs_q)
    project_kv = lambda: (  # heads-major [batch, kv_heads, kv_len, head_dim]
        heads_major(self._projection(self.num_kv_heads, "key", kv_init)(inputs_kv)),
        heads_major(self._projection(self.num_kv_heads, "value", kv_init)(inputs_kv)))
    if not decode:
      key, value = project_kv()
    elif self.is_cross_attention:
      key, value = self._cross_attention_cache(project_kv)
    else:
      key, value = self._self_attention_cache(*project_kv(), decode_position, max_decode_length)

    dropout = nn.Dropout(self.dropout_rate, broadcast_dims=(-2,)) if self.dropout_rate else None
    out = self.attend(query, key, value, bias, dropout, deterministic)
    return layers.DenseGeneral(inputs_q.shape[-1], ("joined_kv", "embed"), num_contracting_axes=2,
                               kernel_init=kv_init, dtype=self.dtype, name="out")(out)

  def attend(self, query: jax.Array, key: jax.Array, value: jax.Array,
             bias: Optional[jax.Array], dropout: Optional[nn.Module] = None,
             deterministic: bool = True) -> jax.Array:
    """`grouped_attention` (shapes there): a method of its own, so that a decode step can run
    it on other kernels without the model knowing (gqa_flax/kernels/plugin.py)."""
    return grouped_attention(query, key, value, bias, dropout, deterministic)

  def _cross_attention_cache(self, project_kv):
    """Encoder K/V, projected only by the call that creates the cache."""
    if self.has_variable("cache", "cached_key"):
      return self.get_variable("cache", "cached_key"), self.get_variable("cache", "cached_value")
    key, value = project_kv()
    self.put_variable("cache", "cached_key", key)
    self.put_variable("cache", "cached_value", value)
    return key, value

  def _self_attention_cache(self, key, value, decode_position, max_decode_length):
    """Writes this step's K/V [batch, kv_heads, q_len, head_dim] at `decode_position`.

    The call that creates the cache (zeros, `max_decode_length` long) leaves it unchanged.
    Returns the whole cache [batch, kv_heads, max_decode_length, head_dim]; the caller's bias
    masks positions not yet decoded. MQA's cache is stored without its size-1 kv_heads axis
    ([batch, max_decode_length, head_dim]): XLA squeezes that axis between the in-place update
    and the attention's matrix product, and on CPU it then duplicates the update and copies
    the cache every step.
    """
    is_initialized = self.has_variable("cache", "cached_key")
    batch, kv_heads, q_len, head_dim = key.shape
    full_shape = (batch, kv_heads, max_decode_length, head_dim)
    shape = (batch, max_decode_length, head_dim) if kv_heads == 1 else full_shape
    cached_key = self.variable("cache", "cached_key", jnp.zeros, shape, key.dtype)
    cached_value = self.variable("cache", "cached_value", jnp.zeros, shape, value.dtype)

    def update(cache, new):  # new in the cache's layout: [batch, (kv_heads,) q_len, head_dim]
      new = new.reshape(cache.shape[:-2] + (q_len, head_dim)).astype(cache.dtype)
      index = (0,) * (cache.ndim - 2) + (decode_position, 0)
      return jax.lax.dynamic_update_slice(cache, new, index)

    key, value = update(cached_key.value, key), update(cached_value.value, value)
    if is_initialized:
      cached_key.value, cached_value.value = key, value
    return key.reshape(full_shape), value.reshape(full_shape)
