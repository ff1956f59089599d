"""The parameter shapes a T5Config implies, and a T5Config inferred from shapes.

T5X checkpoints carry no model config: it is read off the arrays (embedding [vocab, emb],
relative bias [heads, buckets], query kernel [emb, heads*head_dim], key kernels
[emb, kv_heads*head_dim], wi kernels [emb, mlp], layer counts from `layers_{i}`).
"""
import re
from typing import Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
from flax.linen import meta

from gqa_flax import errors
from gqa_flax.checkpoints.arrays import flatten
from gqa_flax.models.config import T5Config
from gqa_flax.models.t5 import Transformer


def expected_shapes(config: T5Config) -> Dict[str, Tuple[int, ...]]:
  """{name: shape} of every parameter of `Transformer(config)`, computed without memory."""
  tokens = jnp.ones((1, 1), jnp.int32)
  init = lambda rng: meta.unbox(Transformer(config).init(rng, tokens, tokens)["params"])
  params = jax.eval_shape(init, jax.random.PRNGKey(0))
  return {name: tuple(leaf.shape) for name, leaf in flatten(params).items()}


def check_shapes(config: T5Config, shapes: Mapping[str, Tuple[int, ...]], source: str) -> None:
  """Raises naming every parameter of `config` that `shapes` lacks or has mis-shaped."""
  expected = expected_shapes(config)
  missing = sorted(set(expected) - set(shapes))
  if missing:
    raise errors.UserError(f"{source}: missing arrays {missing}")
  wrong = [f"{name} {tuple(shapes[name])} (expected {shape})"
           for name, shape in expected.items() if tuple(shapes[name]) != shape]
  if wrong:
    raise errors.UserError(f"{source}: mis-shaped arrays: {'; '.join(wrong)}")


def _num_layers(shapes: Mapping[str, tuple], stack: str) -> int:
  indices = {int(m.group(1)) for name in shapes
             if (m := re.match(rf"{stack}/layers_(\d+)/", name))}
  return max(indices) + 1 if indices else 0


def config_from_shapes(shapes: Mapping[str, Tuple[int, ...]], source: str, **overrides) -> T5Config:
  """The T5Config whose parameters have these shapes (T5X checkpoints store no config)."""
  def shape(name):
    if name not in shapes:
      raise errors.UserError(f"{source}: missing array {name}")
    return shapes[name]

  vocab_size, emb_dim = shape("token_embedder/embedding")
  num_heads, num_buckets = shape("encoder/relpos_bias/rel_embedding")
  head_dim = shape("encoder/layers_0/attention/query/kernel")[1] // num_heads
  mlp = "encoder/layers_0/mlp"
  activations = (("gelu", "linear") if f"{mlp}/wi_0/kernel" in shapes else ("relu",))
  mlp_dim = shape(f"{mlp}/wi_0/kernel" if len(activations) == 2 else f"{mlp}/wi/kernel")[1]

  def kv_heads(kind):
    name = f"decoder/layers_0/{kind}/key/kernel"
    heads, rest = divmod(shape(name)[1], head_dim)
    if rest or not heads or num_heads % heads:
      raise errors.UserError(
          f"{source}: mis-shaped array {name} {tuple(shape(name))}: its width is not "
          f"head_dim={head_dim} times a divisor of num_heads={num_heads}")
    return heads

  fields = dict(
      vocab_size=vocab_size, emb_dim=emb_dim, num_heads=num_heads, head_dim=head_dim,
      mlp_dim=mlp_dim, num_encoder_layers=_num_layers(shapes, "encoder"),
      num_decoder_layers=_num_layers(shapes, "decoder"),
      num_kv_heads=kv_heads("self_attention"),
      cross_num_kv_heads=kv_heads("encoder_decoder_attention"),
      mlp_activations=activations,
      logits_via_embedding="decoder/logits_dense/kernel" not in shapes,
      relative_attention_num_buckets=num_buckets)
  return T5Config(**{**fields, **overrides})
