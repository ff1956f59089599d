"""HF transformers T5 v1.1 checkpoints: `config.json` + `model.safetensors` (or shards).

Read with numpy only (no torch): the safetensors header gives each tensor's dtype, shape and
byte range, and each tensor is read on its own, or only the byte range of the rows a slice
needs; the directory may be local or at a URL (`gs://`, see `paths`). HF stores linear weights
as [out, in]; T5X kernels are [in, out], so they are transposed. The relative attention bias lives in block 0
as [buckets, heads] and becomes `relpos_bias/rel_embedding` [heads, buckets].

Output layer: T5 v1.1 has an untied `lm_head` and no output scaling. transformers 4 marks it
`tie_word_embeddings: false`; transformers 5 always ties `lm_head` to `shared` (and saves no
`lm_head.weight`) and marks v1.1 `scale_decoder_outputs: false`. Either way an unscaled model
gets `decoder/logits_dense/kernel` (lm_head, else shared, transposed); only the original T5's
scaled tied output maps to `logits_via_embedding=True`.
"""
import json
import math
import os
import struct
from typing import Dict, Tuple

import ml_dtypes
import numpy as np
from etils import epath

from gqa_flax import errors
from gqa_flax.checkpoints.arrays import Index, LazyArray
from gqa_flax.models.config import T5Config

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16, "I64": np.int64, "I32": np.int32}
# HF `feed_forward_proj` -> T5X `mlp_activations`.
_ACTIVATIONS = {"gated-gelu": ("gelu", "linear"), "gated-silu": ("silu", "linear"),
                "relu": ("relu",), "gelu": ("gelu",)}
_ATTENTION = {"q": "query", "k": "key", "v": "value", "o": "out"}
_MLP = ("wi", "wi_0", "wi_1", "wo")


def is_hf_checkpoint(path: str) -> bool:
  directory = epath.Path(path)
  return directory.is_dir() and (directory / CONFIG_FILE).exists() and (
      (directory / WEIGHTS_FILE).exists() or (directory / WEIGHTS_INDEX_FILE).exists())


def config_from_hf(hf: dict) -> T5Config:
  """T5Config from a HF T5 `config.json` dict."""
  proj = hf.get("feed_forward_proj", "relu")
  if proj not in _ACTIVATIONS:
    raise errors.UserError(f"feed_forward_proj={proj!r} is not supported; expected one of "
                           f"{sorted(_ACTIVATIONS)}")
  layers = hf["num_layers"]
  return T5Config(
      vocab_size=hf["vocab_size"], emb_dim=hf["d_model"], num_heads=hf["num_heads"],
      head_dim=hf["d_kv"], mlp_dim=hf["d_ff"], num_encoder_layers=layers,
      num_decoder_layers=hf.get("num_decoder_layers") or layers,
      num_kv_heads=hf.get("num_key_value_heads"), mlp_activations=_ACTIVATIONS[proj],
      logits_via_embedding=hf.get("scale_decoder_outputs", hf.get("tie_word_embeddings", True)),
      relative_attention_num_buckets=hf.get("relative_attention_num_buckets", 32),
      relative_attention_max_distance=hf.get("relative_attention_max_distance", 128))


def _read_range(filename: str, offset: int, size: int) -> bytes:
  with epath.Path(filename).open("rb") as f:
    f.seek(offset)
    return f.read(size)


def _stored_tensor(filename: str, offset: int, shape: Tuple[int, ...],
                   dtype: np.dtype) -> LazyArray:
  """The C-order tensor at byte `offset` of `filename`; a slice reads only its rows' bytes."""
  rows, row_shape = (shape[0], shape[1:]) if shape else (1, ())
  row_bytes = math.prod(row_shape) * dtype.itemsize

  def read_rows(start: int, stop: int) -> np.ndarray:
    data = _read_range(filename, offset + start * row_bytes, (stop - start) * row_bytes)
    return np.frombuffer(data, dtype).reshape(stop - start, *row_shape)

  def read_slice(index: Index) -> np.ndarray:
    start, stop, _ = index[0].indices(rows)
    return read_rows(start, stop)[(slice(None), *index[1:])]

  return LazyArray(shape, dtype, lambda: read_rows(0, rows).reshape(shape),
                   read_slice=read_slice if shape else None)


def safetensors_arrays(filename: str) -> Dict[str, LazyArray]:
  """{tensor name: LazyArray} of one .safetensors file, from its header only."""
  size = epath.Path(filename).stat().length
  with errors.reading(filename), epath.Path(filename).open("rb") as f:
    (header_len,) = struct.unpack("<Q", f.read(8))
    if 8 + header_len > size:
      raise ValueError(f"its header of {header_len} bytes does not fit in its {size} bytes")
    header = json.loads(f.read(header_len))
  header.pop("__metadata__", None)
  end = 8 + header_len + max((info["data_offsets"][1] for info in header.values()), default=0)
  if end > size:
    raise errors.UserError(f"{filename}: truncated, {size} bytes where its header needs {end}; "
                           "write, copy or download the checkpoint again")
  arrays = {}
  for name, info in header.items():
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise errors.UserError(f"{filename}: tensor {name} has unsupported dtype {info['dtype']}")
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
    arrays[name] = _stored_tensor(filename, 8 + header_len + info["data_offsets"][0],
                                  tuple(info["shape"]), dtype)
  return arrays


def _transposed(array: LazyArray) -> LazyArray:
  """The transpose of a 2-D `array`; a slice reads the transposed slice of `array`."""
  return LazyArray(array.shape[::-1], array.dtype, lambda: np.ascontiguousarray(array.read().T),
                   read_slice=lambda index: np.ascontiguousarray(array.read_index(index[::-1]).T))


def _t5x_name(hf_name: str) -> Tuple[str, bool]:
  """HF tensor name -> (T5X '/'-joined name or '' to skip, whether to transpose)."""
  parts = hf_name.removesuffix(".weight").split(".")
  if parts == ["shared"]:
    return "token_embedder/embedding", False
  if parts == ["lm_head"]:
    return "decoder/logits_dense/kernel", True
  if parts[1:] == ["embed_tokens"]:
    return "", False  # Copies of `shared` (HF ties them to it).
  stack = parts[0]
  if parts[1:] == ["final_layer_norm"]:
    return f"{stack}/{stack}_norm/scale", False
  _, _, block, _, sublayer, *rest = parts  # encoder.block.3.layer.1.<rest>
  sublayer = int(sublayer)
  if stack == "encoder":
    kinds = ("attention", "mlp")
    norms = ("pre_attention_layer_norm", "pre_mlp_layer_norm")
  else:
    kinds = ("self_attention", "encoder_decoder_attention", "mlp")
    norms = ("pre_self_attention_layer_norm", "pre_cross_attention_layer_norm",
             "pre_mlp_layer_norm")
  prefix = f"{stack}/layers_{block}"
  if rest == ["layer_norm"]:
    return f"{prefix}/{norms[sublayer]}/scale", False
  if rest[-1] == "relative_attention_bias":
    return f"{stack}/relpos_bias/rel_embedding", True
  if rest[-1] in _ATTENTION:
    return f"{prefix}/{kinds[sublayer]}/{_ATTENTION[rest[-1]]}/kernel", True
  if rest[-1] in _MLP:
    return f"{prefix}/mlp/{rest[-1]}/kernel", True
  raise errors.UserError(f"unexpected tensor {hf_name!r} in a HF T5 checkpoint")


def open_hf(path: str) -> Tuple[T5Config, Dict[str, LazyArray]]:
  """(config, {T5X name: LazyArray}) of a HF T5 v1.1 directory, reading no weights yet."""
  with errors.reading(os.path.join(path, CONFIG_FILE)):
    hf_config = json.loads(epath.Path(path, CONFIG_FILE).read_text())
  config = config_from_hf(hf_config)
  index_file = epath.Path(path, WEIGHTS_INDEX_FILE)
  if index_file.exists():
    files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
  else:
    files = [WEIGHTS_FILE]
  arrays = {}
  for filename in files:
    for hf_name, array in safetensors_arrays(os.path.join(path, filename)).items():
      name, transpose = _t5x_name(hf_name)
      if name:
        arrays[name] = _transposed(array) if transpose else array
  logits = "decoder/logits_dense/kernel"
  if config.logits_via_embedding:
    arrays.pop(logits, None)
  elif logits not in arrays and "token_embedder/embedding" in arrays:
    arrays[logits] = _transposed(arrays["token_embedder/embedding"])  # lm_head tied to shared.
  return config, arrays
