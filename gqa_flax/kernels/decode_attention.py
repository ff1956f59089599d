"""One decode step's grouped-query attention on the CPU (`decode_attention.cc`).

XLA:CPU runs a decode step's attention as two batched matrix products (scores, then weights x
values) with softmax passes between them; the kernel reads each K/V head once for all the
query heads of its group, with the softmax in between: 1.0-1.4x XLA's speed on the caches
(`scripts/bench_primitives.py`). Same arguments and result as
`gqa_flax.models.attention.grouped_attention` for q_len 1.
"""
import pathlib

import jax
import jax.numpy as jnp

from gqa_flax.kernels import build

HEAD_DIMS = (16, 32, 64)  # what the kernel is compiled for
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_TARGET = "gqa_decode_attention"


def available() -> bool:
  """Whether the default backend is the CPU and the kernel is built and registered with XLA."""
  return build.register(_SOURCE, "GqaDecodeAttention", _TARGET)


def supports(query: jax.Array, key: jax.Array) -> bool:
  """Whether the kernel takes these shapes: one query position, float32, a compiled head_dim."""
  return (query.shape[1] == 1 and query.shape[-1] in HEAD_DIMS
          and query.dtype == key.dtype == jnp.float32)


def decode_attention(query: jax.Array, key: jax.Array, value: jax.Array,
                     bias: jax.Array) -> jax.Array:
  """Softmax attention of one query position; no 1/sqrt(head_dim) scaling.

  Args:
    query: [batch, 1, heads, head_dim] float32.
    key, value: heads-major [batch, kv_heads, kv_len, head_dim] float32.
    bias: additive, broadcastable to [batch, heads, 1, kv_len].
  Returns:
    [batch, 1, heads, head_dim] float32.
  """
  if not available():
    raise RuntimeError("decode_attention needs the CPU backend and a C++ compiler (see the "
                       "log); decode with cpu_kernels=False")
  batch, _, heads, head_dim = query.shape
  kv_heads, kv_len = key.shape[1], key.shape[2]
  group = heads // kv_heads
  query = query.reshape(batch, kv_heads, group, head_dim)
  bias = jnp.broadcast_to(bias, (batch, heads, 1, kv_len)).astype(jnp.float32)
  out = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(query.shape, jnp.float32))(
      query, key, value, bias.reshape(batch, kv_heads, group, kv_len))
  return out.reshape(batch, 1, heads, head_dim)
