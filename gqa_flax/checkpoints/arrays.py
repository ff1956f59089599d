"""Lazily read checkpoint arrays and '/'-joined parameter names.

Every reader in this package describes a checkpoint as `{name: LazyArray}` with T5X names
joined by '/' (`decoder/layers_0/self_attention/key/kernel`), so that the converter can read,
convert and write one array at a time and `load` can read them all.
"""
import dataclasses
import math
from typing import Callable, Dict, Mapping, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """An array stored in a checkpoint, read from disk only when `read()` is called."""
  shape: Tuple[int, ...]
  dtype: np.dtype
  read: Callable[[], np.ndarray]

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize


def in_memory(array: np.ndarray) -> LazyArray:
  """A LazyArray around an array that is already in memory."""
  array = np.asarray(array)
  return LazyArray(tuple(array.shape), array.dtype, lambda: array)


def flatten(tree: Mapping, prefix: str = "") -> Dict[str, object]:
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      flat.update(flatten(value, name + "/"))
    else:
      flat[name] = value
  return flat


def unflatten(flat: Mapping[str, object]) -> dict:
  """{'a/b/c': leaf} -> nested dict."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree
