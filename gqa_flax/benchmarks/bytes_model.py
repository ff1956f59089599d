"""Bytes read from memory by one greedy decode step: what GQA shrinks.

Per step the decoder reads
  params      every decoder parameter (all layers, final norm, relative position table,
              `logits_dense`), plus one embedding row per sequence;
  self cache  the self-attention K and V of every layer, the whole `max_decode_length`
              long cache: our step attends over all of it and masks what is not decoded yet;
  cross K/V   the encoder-decoder attention K and V of every layer over the whole input.
Both caches are `layers x 2 x batch x length x kv_heads x head_dim` elements, so they scale
with the number of K/V heads; the params barely do. Writes (one cache row, activations) are
negligible next to these reads.
"""
import dataclasses

import numpy as np

from gqa_flax.models.config import T5Config


@dataclasses.dataclass(frozen=True)
class StepBytes:
  params: int
  self_cache: int
  cross_kv: int

  @property
  def total(self) -> int:
    return self.params + self.self_cache + self.cross_kv

  def as_dict(self) -> dict:
    return {"params": self.params, "self_cache": self.self_cache, "cross_kv": self.cross_kv,
            "total": self.total}


def decoder_param_count(config: T5Config) -> int:
  """Parameters a decode step reads (the embedding only as one row per sequence: excluded)."""
  emb, inner = config.emb_dim, config.num_heads * config.head_dim
  attention = lambda kv_heads: 2 * emb * inner + 2 * emb * kv_heads * config.head_dim
  mlp = len(config.mlp_activations) * emb * config.mlp_dim + config.mlp_dim * emb
  layer = (attention(config.num_kv_heads) + attention(config.cross_num_kv_heads) + mlp
           + 3 * emb)  # three layer norms
  logits = 0 if config.logits_via_embedding else emb * config.vocab_size
  relpos = config.num_heads * config.relative_attention_num_buckets
  return config.num_decoder_layers * layer + emb + relpos + logits


def step_bytes(config: T5Config, batch: int, inputs_len: int, max_decode_length: int,
               param_bytes: int = 4) -> StepBytes:
  """Bytes one decode step reads; caches are in the activation dtype `config.dtype`."""
  act = np.dtype(config.dtype).itemsize
  kv = lambda length, heads: (config.num_decoder_layers * 2 * batch * length * heads
                              * config.head_dim * act)
  extra = config.emb_dim * batch * param_bytes  # the embedding rows
  return StepBytes(params=decoder_param_count(config) * param_bytes + extra,
                   self_cache=kv(max_decode_length, config.num_kv_heads),
                   cross_kv=kv(inputs_len, config.cross_num_kv_heads))
