"""T5.1.1 configuration with grouped-query attention in the decoder.

`T5Config` mirrors T5X's `network.T5Config` (examples/t5/network.py) and adds the number of
key/value heads for the decoder's self-attention and encoder-decoder (cross) attention:

  num_kv_heads == num_heads  -> multi-head attention (MHA, GQA-H)
  1 < num_kv_heads < heads   -> grouped-query attention (GQA-G)
  num_kv_heads == 1          -> multi-query attention (MQA, GQA-1)

The encoder's self-attention always stays multi-head (paper, section 3.1).
"""
import dataclasses
from typing import Any, Optional, Sequence

import gin
import jax.numpy as jnp

from gqa_flax import errors

# T5X `t5_1_1/{size}.gin`: emb_dim, num_heads, head_dim, mlp_dim, encoder/decoder layers.
_T5_1_1_SIZES = {
    "tiny": dict(emb_dim=8, num_heads=4, head_dim=3, mlp_dim=16, num_encoder_layers=2, num_decoder_layers=2),
    "small": dict(emb_dim=512, num_heads=6, head_dim=64, mlp_dim=1024, num_encoder_layers=8, num_decoder_layers=8),
    "base": dict(emb_dim=768, num_heads=12, head_dim=64, mlp_dim=2048, num_encoder_layers=12, num_decoder_layers=12),
    "large": dict(emb_dim=1024, num_heads=16, head_dim=64, mlp_dim=2816, num_encoder_layers=24, num_decoder_layers=24),
    "xl": dict(emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120, num_encoder_layers=24, num_decoder_layers=24),
    "xxl": dict(emb_dim=4096, num_heads=64, head_dim=64, mlp_dim=10240, num_encoder_layers=24, num_decoder_layers=24),
}
PRESETS = tuple(_T5_1_1_SIZES)

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  """Hyper-parameters of a T5.1.1 encoder-decoder with GQA in the decoder.

  `num_kv_heads` sets the decoder self-attention's key/value heads and defaults to
  `num_heads`; `cross_num_kv_heads` sets the encoder-decoder attention's and defaults to
  `num_kv_heads` (the paper converts both). Both must divide `num_heads`.
  """

  vocab_size: int = 32128
  emb_dim: int = 512
  num_heads: int = 6
  head_dim: int = 64
  mlp_dim: int = 1024
  num_encoder_layers: int = 8
  num_decoder_layers: int = 8
  num_kv_heads: Optional[int] = None
  cross_num_kv_heads: Optional[int] = None
  dropout_rate: float = 0.0
  dtype: Any = "bfloat16"
  mlp_activations: Sequence[str] = ("gelu", "linear")
  logits_via_embedding: bool = False
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128

  def __post_init__(self):
    kv = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
    cross_kv = kv if self.cross_num_kv_heads is None else self.cross_num_kv_heads
    for name, value in (("num_kv_heads", kv), ("cross_num_kv_heads", cross_kv)):
      if value < 1 or self.num_heads % value:
        raise errors.UserError(
            f"{name}={value} must be a positive divisor of num_heads={self.num_heads} "
            f"(GQA splits the {self.num_heads} query heads into {name} equal groups)")
    object.__setattr__(self, "num_kv_heads", kv)
    object.__setattr__(self, "cross_num_kv_heads", cross_kv)
    object.__setattr__(self, "mlp_activations", tuple(self.mlp_activations))
    if isinstance(self.dtype, str):
      if self.dtype not in _DTYPES:
        raise errors.UserError(f"dtype={self.dtype!r} is not one of {sorted(_DTYPES)}")
      object.__setattr__(self, "dtype", _DTYPES[self.dtype])

  def replace(self, **changes) -> "T5Config":
    """A copy with `changes`; num_kv_heads changes carry to cross_num_kv_heads unless set."""
    if "num_kv_heads" in changes and "cross_num_kv_heads" not in changes:
      if self.cross_num_kv_heads == self.num_kv_heads:
        changes["cross_num_kv_heads"] = None
    return dataclasses.replace(self, **changes)

  @property
  def attention_name(self) -> str:
    """'MHA', 'MQA' or 'GQA-G' for the decoder self-attention."""
    if self.num_kv_heads == self.num_heads:
      return "MHA"
    return "MQA" if self.num_kv_heads == 1 else f"GQA-{self.num_kv_heads}"


@gin.configurable
def t5_1_1_config(size: str = "small", **overrides) -> T5Config:
  """The T5X T5.1.1 preset `size` (tiny, small, base, large, xl, xxl) with `overrides`."""
  if size not in _T5_1_1_SIZES:
    raise errors.UserError(f"unknown T5.1.1 size {size!r}; choose one of {', '.join(PRESETS)}")
  return T5Config(**{**_T5_1_1_SIZES[size], **overrides})


def config_to_dict(config: T5Config) -> dict:
  """JSON-ready fields of `config` (dtype as its name), stored beside checkpoints."""
  fields = dataclasses.asdict(config)
  fields["dtype"] = jnp.dtype(config.dtype).name
  fields["mlp_activations"] = list(config.mlp_activations)
  return fields


def config_from_dict(fields: dict) -> T5Config:
  """Inverse of `config_to_dict`; unknown keys are an error naming them."""
  known = {f.name for f in dataclasses.fields(T5Config)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise errors.UserError(f"unknown T5Config fields {unknown}; known fields: {sorted(known)}")
  return T5Config(**fields)
