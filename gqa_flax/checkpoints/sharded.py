"""Restoring a checkpoint of any format straight onto a mesh.

Each parameter becomes a global `jax.Array` in the sharding asked for, and each process reads
only the slices its own devices hold, cast to the wanted dtype as they are read: Orbax
checkpoints through Orbax's sharded restore; T5X legacy (TensorStore partial reads), HF
(safetensors byte ranges) and inline arrays through `jax.make_array_from_callback` over their
LazyArrays. No process holds a host copy of the whole model, so this works in a multi-process
(pod) run as in one process; every process must call it, like any other collective setup.
"""
from typing import Any, Callable, Dict, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from gqa_flax.checkpoints import orbax_format
from gqa_flax.checkpoints.arrays import Index, LazyArray, flatten, unflatten
from gqa_flax.checkpoints.reader import LoadedCheckpoint, open_checkpoint
from gqa_flax.models.config import T5Config

ShardingsFn = Callable[[T5Config], Mapping[str, Any]]


def _cast_dtype(stored: np.dtype, dtype: Optional[Any]) -> np.dtype:
  """`dtype` for floating arrays (None: as stored); other arrays keep theirs."""
  if dtype is None or not jnp.issubdtype(stored, jnp.floating):
    return np.dtype(stored)
  return np.dtype(dtype)


def _explicit(index: Index, shape) -> Index:
  return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def read_sharded(array: LazyArray, sharding: jax.sharding.Sharding,
                 dtype: Optional[Any] = None) -> jax.Array:
  """`array` as a global jax.Array laid out by `sharding`, floating values cast to `dtype`.

  Reads only the slices of this process's devices, each distinct slice once.
  """
  dtype = _cast_dtype(array.dtype, dtype)
  slices: Dict[tuple, np.ndarray] = {}

  def shard(index: Index) -> np.ndarray:
    index = _explicit(index, array.shape)
    key = tuple((s.start, s.stop) for s in index)
    if key not in slices:
      slices[key] = np.asarray(array.read_index(index)).astype(dtype, copy=False)
    return slices[key]

  return jax.make_array_from_callback(array.shape, sharding, shard)


def load_sharded(path: str, shardings_fn: ShardingsFn,
                 dtype: Optional[Any] = None) -> LoadedCheckpoint:
  """The checkpoint at `path` (any format) with params as global jax.Arrays on a mesh.

  shardings_fn(config) -> nested dict of jax.sharding.Sharding (e.g. NamedSharding), the
    same T5X-named tree as the params, for the checkpoint's config.
  dtype: the dtype of the floating params (e.g. jnp.bfloat16; None: as stored).
  """
  source = open_checkpoint(path)
  shardings = flatten(shardings_fn(source.config))
  if shardings.keys() != source.arrays.keys():
    missing, extra = sorted(source.arrays.keys() - shardings), sorted(shardings - source.arrays.keys())
    raise ValueError(f"shardings_fn names other params than {path}: missing {missing[:3]}, "
                     f"unknown {extra[:3]}; give one sharding per checkpoint parameter")
  if source.format == "orbax":
    params = orbax_format.restore_sharded(source.path, {
        name: jax.ShapeDtypeStruct(array.shape, _cast_dtype(array.dtype, dtype),
                                   sharding=shardings[name])
        for name, array in source.arrays.items()})
  else:
    params = {name: read_sharded(array, shardings[name], dtype)
              for name, array in source.arrays.items()}
  return LoadedCheckpoint(source.config, unflatten(params), source.step, source.metadata)
