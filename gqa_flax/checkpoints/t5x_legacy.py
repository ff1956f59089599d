"""Legacy T5X checkpoints: `checkpoint_<step>/checkpoint` (msgpack) + TensorStore zarr arrays.

The msgpack file (`flax.serialization`) holds `{'version', 'optimizer': {'target': params,
'state': {'step', 'param_states'}}}`. Small arrays are inline; large ones are replaced by a
TensorStore spec `{'driver': 'zarr', 'kvstore': {'driver': 'file'|'gfile'|'gcs', 'path'},
'metadata': {...}, 'dtype'}` whose data lives in a zarr directory next to the msgpack file,
named by the array's path with '.' (`target.decoder.layers_0.self_attention.key.kernel/`). The
zarr directories carry no `.zarray`, so they are opened with the spec's metadata. Paths are
resolved against the checkpoint directory (`gs://` paths and the `gcs` driver too: a public
checkpoint copied to local disk is read from there). Arrays are read only when asked for.
"""
import os
from typing import Any, Dict, Optional, Tuple

import numpy as np
import tensorstore as ts
from flax import serialization

from gqa_flax.checkpoints.arrays import LazyArray, flatten, in_memory, unflatten

CHECKPOINT_FILE = "checkpoint"


def msgpack_file(path: str) -> Optional[str]:
  """The msgpack file of a legacy T5X checkpoint at `path` (its directory or the file), or None."""
  filename = os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path
  if not os.path.isfile(filename):
    return None
  with open(filename, "rb") as f:
    head = f.read(64)
  return filename if head[:1] in (b"\x81", b"\x82", b"\x83") and b"optimizer" in head else None


def _is_tensorstore_spec(value: Any) -> bool:
  return isinstance(value, dict) and value.get("driver") in ("zarr", "zarr3", "n5")


def _local_path(kvstore: Dict[str, Any], checkpoint_dir: str) -> str:
  """Where the array's files are on this machine: relative paths join the checkpoint dir."""
  path = kvstore.get("path", "")
  if kvstore["driver"] in ("file", "gfile") and not path.startswith("gs://"):
    if not os.path.isabs(path):
      return os.path.join(checkpoint_dir, path)
    if os.path.exists(path):
      return path
  return os.path.join(checkpoint_dir, os.path.basename(path.rstrip("/")))  # Copied from GCS.


def _zarr_array(spec: Dict[str, Any], checkpoint_dir: str) -> LazyArray:
  spec = dict(spec, kvstore={"driver": "file", "path": _local_path(spec["kvstore"], checkpoint_dir)})
  shape = tuple(spec["metadata"]["shape"])
  dtype = np.dtype(ts.dtype(spec["dtype"]).numpy_dtype)

  def read():
    if not os.path.isdir(spec["kvstore"]["path"]):
      raise FileNotFoundError(f"TensorStore array directory {spec['kvstore']['path']} is missing")
    store = ts.open(spec, open=True, assume_metadata=True).result()
    return store.read().result()

  return LazyArray(shape, dtype, read)


def read_tree(path: str) -> dict:
  """The whole msgpack tree of a legacy checkpoint; TensorStore arrays become LazyArrays."""
  filename = msgpack_file(path)
  if filename is None:
    raise ValueError(f"{path} is not a legacy T5X checkpoint (no msgpack file {CHECKPOINT_FILE!r})")
  with open(filename, "rb") as f:
    tree = serialization.msgpack_restore(f.read())
  checkpoint_dir = os.path.dirname(os.path.abspath(filename))

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
  """
  os.makedirs(directory, exist_ok=True)
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
    store = ts.open(dict(spec, kvstore={"driver": "file", "path": os.path.join(directory, path)}),
                    create=True, delete_existing=True).result()
    store.write(value).result()
    target[name] = spec
    del value, store
  tree = {"version": 3, "optimizer": {"target": unflatten(target),
                                      "state": {"step": np.int32(step), "param_states": {}}}}
  with open(os.path.join(directory, CHECKPOINT_FILE), "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
