"""Legacy T5X checkpoints: `checkpoint_<step>/checkpoint` (msgpack) + TensorStore zarr arrays.

The msgpack file (`flax.serialization`) holds `{'version', 'optimizer': {'target': params,
'state': {'step', 'param_states'}}}`. Small arrays are inline; large ones are replaced by a
TensorStore spec `{'driver': 'zarr', 'kvstore': {'driver': 'file'|'gfile'|'gcs', 'path'},
'metadata': {...}, 'dtype'}` whose data lives in a zarr directory next to the msgpack file,
named by the array's path with '.' (`target.decoder.layers_0.self_attention.key.kernel/`). The
zarr directories carry no `.zarray`, so they are opened with the spec's metadata. Paths are
resolved against the checkpoint directory, wherever the spec says the array was written
(`gs://` paths and the `gcs` driver too: a public checkpoint copied elsewhere is read from its
copy); the checkpoint itself may be local or at a URL (`gs://`, see `paths`). Arrays are read
only when asked for, in row blocks or any slice: an array stored as one gzip chunk (as
`write_t5x_legacy` writes them) is inflated piecewise into each block; others are read with
TensorStore partial reads.
"""
import dataclasses
import os
import zlib
from typing import Any, BinaryIO, Dict, Iterator, Optional, Tuple

import numpy as np
import tensorstore as ts
from etils import epath
from flax import serialization

from gqa_flax import errors
from gqa_flax.checkpoints import paths
from gqa_flax.checkpoints.arrays import LazyArray, flatten, in_memory, unflatten

CHECKPOINT_FILE = "checkpoint"
_READ_BYTES = 2**20  # Compressed bytes read, and bytes inflated, per step of a streamed chunk.


def msgpack_file(path: str) -> Optional[str]:
  """The msgpack file of a legacy T5X checkpoint at `path` (its directory or the file), or None."""
  filename = os.path.join(path, CHECKPOINT_FILE) if epath.Path(path).is_dir() else path
  if not epath.Path(filename).is_file():
    return None
  with epath.Path(filename).open("rb") as f:
    head = f.read(64)
  return filename if head[:1] in (b"\x81", b"\x82", b"\x83") and b"optimizer" in head else None


def _is_tensorstore_spec(value: Any) -> bool:
  return isinstance(value, dict) and value.get("driver") in ("zarr", "zarr3", "n5")


def _array_path(kvstore: Dict[str, Any], checkpoint_dir: str) -> str:
  """Where the array's files are: relative paths join the checkpoint dir."""
  path = kvstore.get("path", "")
  if kvstore["driver"] in ("file", "gfile") and not paths.is_url(path):
    if not os.path.isabs(path):
      return os.path.join(checkpoint_dir, path)
    if not paths.is_url(checkpoint_dir) and os.path.exists(path):
      return path
  return os.path.join(checkpoint_dir, os.path.basename(path.rstrip("/")))  # A copy.


def _single_gzip_chunk(spec: Dict[str, Any], directory: str) -> Optional[str]:
  """The file of a zarr array (in `directory`) stored as one gzip C-order chunk, else None."""
  metadata = spec["metadata"]
  shape = list(metadata["shape"])
  if (spec["driver"] != "zarr" or not shape or metadata.get("chunks") != shape
      or metadata.get("order", "C") != "C" or metadata.get("filters") or "dtype" in metadata
      or (metadata.get("compressor") or {}).get("id") != "gzip"):
    return None
  key = metadata.get("dimension_separator", ".").join("0" * len(shape))
  filename = os.path.join(directory, key)
  return filename if epath.Path(filename).is_file() else None


def _gunzip_into(out: np.ndarray, f: BinaryIO, decompressor) -> None:
  """Fills the uint8 array `out` with the next bytes that `decompressor` inflates from `f`."""
  filled = 0
  while filled < len(out):
    data = decompressor.unconsumed_tail or f.read(_READ_BYTES)
    piece = decompressor.decompress(data, min(len(out) - filled, _READ_BYTES))
    if not piece and not data:
      raise EOFError(f"{f.name}: gzip chunk ends before the array does")
    out[filled:filled + len(piece)] = np.frombuffer(piece, np.uint8)
    filled += len(piece)


def _gunzip_blocks(filename: str, shape: Tuple[int, ...], dtype: np.dtype,
                   rows: int) -> Iterator[np.ndarray]:
  """[rows, *shape[1:]] blocks of the C-order array gzipped in `filename`, inflated piecewise."""
  decompressor = zlib.decompressobj(zlib.MAX_WBITS | 16)
  with epath.Path(filename).open("rb") as f:
    for start in range(0, shape[0], rows):
      block = np.empty((min(rows, shape[0] - start), *shape[1:]), dtype)
      _gunzip_into(block.reshape(-1).view(np.uint8), f, decompressor)
      yield block


def _tensorstore_blocks(store: ts.TensorStore, rows: int) -> Iterator[np.ndarray]:
  """Row blocks of `store` read with partial reads, each a whole number of chunk rows."""
  chunk_rows = store.chunk_layout.read_chunk.shape[0]
  rows = -(-rows // chunk_rows) * chunk_rows
  for start in range(0, store.shape[0], rows):
    yield store[start:min(start + rows, store.shape[0])].read().result()


def _zarr_array(spec: Dict[str, Any], checkpoint_dir: str) -> LazyArray:
  """A LazyArray of a TensorStore array; row blocks stream (gunzipped or partial reads)."""
  directory = _array_path(spec["kvstore"], checkpoint_dir)
  spec = dict(spec, kvstore=paths.kvstore(directory))
  shape = tuple(spec["metadata"]["shape"])
  dtype = np.dtype(ts.dtype(spec["dtype"]).numpy_dtype)

  def open_store():
    if not epath.Path(directory).is_dir():
      raise errors.MissingPathError(
          f"TensorStore array directory {directory} is missing; copy the whole checkpoint again")
    return ts.open(spec, open=True, assume_metadata=True).result()

  def read(index=()):
    with errors.reading(directory):
      return open_store()[index].read().result()

  array = LazyArray(shape, dtype, read, read_slice=read)
  if not shape:
    return array

  def read_blocks():
    with errors.reading(directory):
      chunk_file = _single_gzip_chunk(spec, directory)
      if chunk_file:
        yield from _gunzip_blocks(chunk_file, shape, dtype, array.block_rows())
      else:
        yield from _tensorstore_blocks(open_store(), array.block_rows())

  return dataclasses.replace(array, read_blocks=read_blocks)


def read_tree(path: str) -> dict:
  """The whole msgpack tree of a legacy checkpoint; TensorStore arrays become LazyArrays."""
  filename = msgpack_file(path)
  if filename is None:
    raise errors.UserError(
        f"{path} is not a legacy T5X checkpoint (no msgpack file {CHECKPOINT_FILE!r})")
  with errors.reading(filename), epath.Path(filename).open("rb") as f:
    tree = serialization.msgpack_restore(f.read())
  checkpoint_dir = os.path.dirname(paths.absolute(filename))

  def lazy(node):
    if _is_tensorstore_spec(node):
      return _zarr_array(node, checkpoint_dir)
    if isinstance(node, dict):
      return {key: lazy(value) for key, value in node.items()}
    return in_memory(node)

  return lazy(tree)


def open_t5x_legacy(path: str) -> Tuple[Dict[str, LazyArray], Optional[int]]:
  """({name: LazyArray} of the model parameters ('optimizer/target'), step)."""
  optimizer = read_tree(path)["optimizer"]
  step = optimizer.get("state", {}).get("step")
  return flatten(optimizer["target"]), None if step is None else int(step.read())


def write_t5x_legacy(directory: str, params: Dict[str, Any], step: int,
                     inline_max_bytes: int = 2**16) -> None:
  """Writes `params` ({'/'-joined name: array or LazyArray}) as T5X does, one array at a time.

  Arrays above `inline_max_bytes` go to gzip zarr directories `target.<name with .>/` (kvstore
  driver 'gfile' with a relative path, as T5X writes); the rest are inline in the msgpack.
  `directory` may be a URL (`gs://...`).
  """
  epath.Path(directory).mkdir(parents=True, exist_ok=True)
  target = {}
  for name, array in params.items():
    value = array.read() if isinstance(array, LazyArray) else np.asarray(array)
    if value.nbytes <= inline_max_bytes:
      target[name] = value
      continue
    path = "target." + name.replace("/", ".")
    spec = {"driver": "zarr", "dtype": np.dtype(value.dtype).name,
            "kvstore": {"driver": "gfile", "path": path},
            "metadata": {"chunks": list(value.shape), "compressor": {"id": "gzip", "level": 1},
                         "shape": list(value.shape)}}
    store = ts.open(dict(spec, kvstore=paths.kvstore(os.path.join(directory, path))),
                    create=True, delete_existing=True).result()
    store.write(value).result()
    target[name] = spec
    del value, store
  tree = {"version": 3, "optimizer": {"target": unflatten(target),
                                      "state": {"step": np.int32(step), "param_states": {}}}}
  with epath.Path(directory, CHECKPOINT_FILE).open("wb") as f:
    f.write(serialization.msgpack_serialize(tree))
