"""T5.1.1 building blocks with T5X's parameter names, joined kernels and logical axes.

Every parameter is created through `nn.with_logical_partitioning`, so `init` returns
`nn.LogicallyPartitioned` boxes whose `names` are T5X's logical axis names; `apply`
accepts plain (unboxed) arrays as T5X checkpoints hold them.
"""
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")

def _param(module: nn.Module, name: str, init: Initializer, shape: Tuple[int, ...],
           axes: Tuple[str, ...]) -> jax.Array:
  """A float32 parameter carrying logical axis names `axes`."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class LayerNorm(nn.Module):
  """T5's RMS layer norm: no mean, no bias, computed in float32. Param `scale` [emb]."""
  epsilon: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    scale = _param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",))
    return (x32 * jax.lax.rsqrt(variance + self.epsilon) * scale).astype(self.dtype)


class DenseGeneral(nn.Module):
  """A dense layer whose kernel is stored joined as 2-D `[prod(in), prod(features)]`.

  Contracts the last `len(in_shape)` axes of the input; e.g. a query projection maps
  `[batch, len, emb]` to `[batch, len, heads, head_dim]` with a `[emb, heads*head_dim]` kernel.
  """
  features: Sequence[int]
  kernel_axes: Tuple[str, str]
  num_contracting_axes: int = 1
  kernel_init: Initializer = default_kernel_init
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = tuple(np.atleast_1d(self.features))
    in_shape = x.shape[-self.num_contracting_axes:]
    kernel_shape = (int(np.prod(in_shape)), int(np.prod(features)))
    # As in T5X, the initializer sees the joined 2-D shape: fan_in = prod(in_shape).
    kernel = _param(self, "kernel", self.kernel_init, kernel_shape, self.kernel_axes)
    kernel = jnp.asarray(kernel, self.dtype).reshape(in_shape + features)
    x = jnp.asarray(x, self.dtype)
    contract = tuple(range(x.ndim - len(in_shape), x.ndim))
    return jax.lax.dot_general(x, kernel, ((contract, tuple(range(len(in_shape)))), ((), ())))


class Embed(nn.Module):
  """Token embedding `embedding [vocab, emb]`, initialised normal(stddev 1.0)."""
  num_embeddings: int
  features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    embedding = _param(self, "embedding", nn.initializers.normal(stddev=1.0),
                       (self.num_embeddings, self.features), ("vocab", "embed"))
    return jnp.take(jnp.asarray(embedding, self.dtype), tokens, axis=0)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits from the tied embedding: x [..., emb] -> [..., vocab] (float32)."""
    embedding = nn.meta.unbox(self.get_variable("params", "embedding"))
    return jnp.einsum("...e,ve->...v", x.astype(jnp.float32), jnp.asarray(embedding, jnp.float32))


_ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu, "linear": lambda x: x, "silu": nn.silu}


class MlpBlock(nn.Module):
  """Gated MLP: `wo(act_0(wi_0 x) * act_1(wi_1 x))`; T5.1.1 uses ('gelu', 'linear')."""
  mlp_dim: int
  activations: Sequence[str] = ("gelu", "linear")
  intermediate_dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
    hidden = 1.0
    for i, name in enumerate(self.activations):
      suffix = f"_{i}" if len(self.activations) > 1 else ""
      h = DenseGeneral(self.mlp_dim, ("embed", "mlp"), dtype=self.dtype, name=f"wi{suffix}")(x)
      hidden = hidden * _ACTIVATIONS[name](h)
    hidden = nn.Dropout(self.intermediate_dropout_rate, broadcast_dims=(-2,))(
        hidden, deterministic=deterministic)
    return DenseGeneral(x.shape[-1], ("mlp", "embed"), dtype=self.dtype, name="wo")(hidden)


def relative_position_bucket(relative_position: jax.Array, bidirectional: bool,
                             num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucketing of `memory_position - query_position` (same as T5X and HF)."""
  ret = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    ret = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  is_small = n < max_exact
  val_if_large = max_exact + (
      jnp.log(n.astype(jnp.float32) / max_exact + np.finfo(np.float32).eps)
      / np.log(max_distance / max_exact) * (num_buckets - max_exact)).astype(jnp.int32)
  val_if_large = jnp.minimum(val_if_large, num_buckets - 1)
  return ret + jnp.where(is_small, n, val_if_large)


class RelativePositionBiases(nn.Module):
  """One bias per (query head, bucket), shared by all layers of a stack.

  Param `rel_embedding [heads, num_buckets]`. Returns `[1, heads, q_len, k_len]`.
  """
  num_heads: int
  num_buckets: int
  max_distance: int
  bidirectional: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
    """query_positions [q_len], key_positions [k_len] (absolute, int)."""
    relative = key_positions[None, :] - query_positions[:, None]  # [q_len, k_len]
    buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets,
                                       self.max_distance)
    table = _param(self, "rel_embedding", nn.initializers.variance_scaling(1.0, "fan_avg", "uniform"),
                   (self.num_heads, self.num_buckets), ("heads", "relpos_buckets"))
    bias = jnp.take(jnp.asarray(table, self.dtype), buckets, axis=1)  # [heads, q_len, k_len]
    return bias[None]
