"""One random T5 v1.1 for both sides: built and saved by HF, loaded by our importer.

GQA-G variants are made from it as the paper makes them (section 2.1): each group's decoder
key/value projection is the mean of its heads' (`gqa_flax.checkpoints.convert.mean_pool_kv`).
"""
from typing import Tuple

import numpy as np

from gqa_flax import checkpoints
from gqa_flax.checkpoints.convert import mean_pool_kv
from gqa_flax.models import T5Config

PyTree = dict
_ACTIVATIONS = {("gelu", "linear"): "gated-gelu", ("silu", "linear"): "gated-silu"}


def save_random_hf_t5(config: T5Config, path: str, seed: int = 0):
  """Saves a randomly initialised HF T5ForConditionalGeneration shaped like `config`
  (multi-head, untied output layer) to `path` with safetensors; returns the torch model."""
  import torch
  import transformers
  torch.manual_seed(seed)
  hf_config = transformers.T5Config(
      vocab_size=config.vocab_size, d_model=config.emb_dim, d_kv=config.head_dim,
      d_ff=config.mlp_dim, num_layers=config.num_encoder_layers,
      num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
      relative_attention_num_buckets=config.relative_attention_num_buckets,
      relative_attention_max_distance=config.relative_attention_max_distance,
      feed_forward_proj=_ACTIVATIONS[tuple(config.mlp_activations)], tie_word_embeddings=False,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def load_ours(path: str, dtype: str = "float32") -> Tuple[T5Config, PyTree]:
  """(config, params) of the HF directory `path` through `gqa_flax.checkpoints.load`;
  params are cast to `dtype` (the activation dtype) so a step reads no float32 copy."""
  config, params = checkpoints.load(path)
  config = config.replace(dtype=dtype)
  cast = lambda tree: ({k: cast(v) for k, v in tree.items()} if isinstance(tree, dict)
                       else np.asarray(tree).astype(config.dtype))
  return config, cast(params)


def with_kv_heads(config: T5Config, params: PyTree, kv_heads: int) -> Tuple[T5Config, PyTree]:
  """The multi-head (config, params) with `kv_heads` decoder K/V heads, mean-pooled."""
  decoder = dict(params["decoder"])
  for name, layer in decoder.items():
    if not name.startswith("layers_"):
      continue
    layer = dict(layer)
    for kind in ("self_attention", "encoder_decoder_attention"):
      attention = dict(layer[kind])
      for proj in ("key", "value"):
        kernel = np.asarray(attention[proj]["kernel"])
        attention[proj] = {"kernel": mean_pool_kv(kernel, kv_heads, config.head_dim)}
      layer[kind] = attention
    decoder[name] = layer
  return config.replace(num_kv_heads=kv_heads), {**params, "decoder": decoder}
