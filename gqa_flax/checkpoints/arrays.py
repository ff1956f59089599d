"""Lazily read checkpoint arrays and '/'-joined parameter names.

Every reader in this package describes a checkpoint as `{name: LazyArray}` with T5X names
joined by '/' (`decoder/layers_0/self_attention/key/kernel`), so that the converter can read,
convert and write one array at a time and `load` can read them all. Readers that can read an
array in row blocks (TensorStore partial reads, a streamed gzip chunk) also give `read_blocks`,
so that even the largest arrays stream through the converter a few MiB at a time, and readers
that can read any rectangular slice (TensorStore, safetensors byte ranges) give `read_slice`,
so that a process restoring onto a mesh reads only the shards its devices hold.
"""
import dataclasses
import math
from typing import Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

Index = Tuple[slice, ...]  # One slice(start, stop) per dimension.

import numpy as np

from gqa_flax import errors

BLOCK_BYTES = 8 * 2**20  # Target size of the row blocks arrays stream in.


@dataclasses.dataclass(frozen=True)
class LazyArray:
  """An array stored in a checkpoint, read from disk only when `read()` is called.

  `read_blocks()`, where given, yields the array's successive row blocks ([n_i, *shape[1:]],
  any n_i) without holding the whole array; `read_slice(index)`, where given, reads only
  `array[index]` (index: one slice(start, stop) per dimension).
  """
  shape: Tuple[int, ...]
  dtype: np.dtype
  read: Callable[[], np.ndarray]
  read_blocks: Optional[Callable[[], Iterator[np.ndarray]]] = None
  read_slice: Optional[Callable[[Index], np.ndarray]] = None

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * np.dtype(self.dtype).itemsize

  def block_rows(self) -> int:
    """Rows per block of about BLOCK_BYTES (at least 1) of this array (ndim >= 1)."""
    return max(1, BLOCK_BYTES * self.shape[0] // max(self.nbytes, 1))

  def read_index(self, index: Index) -> np.ndarray:
    """array[index] (a slice per dimension), reading only that part where the reader can."""
    return self.read_slice(index) if self.read_slice else self.read()[index]

  def blocks(self, rows: int) -> Iterator[np.ndarray]:
    """Successive [rows, *shape[1:]] blocks (the last may have fewer rows) of this array."""
    return rebatched(self.read_blocks() if self.read_blocks else [self.read()], rows)


def rebatched(blocks: Iterable[np.ndarray], rows: int) -> Iterator[np.ndarray]:
  """Row blocks of any sizes -> blocks of exactly `rows` rows (the last may have fewer)."""
  pending, count = [], 0
  for block in blocks:
    while len(block):
      piece, block = block[:rows - count], block[rows - count:]
      pending.append(piece)
      count += len(piece)
      if count == rows:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)
        pending, count = [], 0
  if pending:
    yield np.concatenate(pending)


def mapped(array: LazyArray, fn: Callable[[np.ndarray], np.ndarray],
           shape: Optional[Tuple[int, ...]] = None, dtype: Optional[np.dtype] = None) -> LazyArray:
  """`fn(array)` as a LazyArray; `fn` must act on rows independently (it is given row blocks).

  shape, dtype: those of the result (default: those of `array`); rows are kept.
  """
  blocks = None if array.read_blocks is None else lambda: map(fn, array.read_blocks())
  return LazyArray(shape or array.shape, array.dtype if dtype is None else dtype,
                   lambda: fn(array.read()), blocks)


def guarded(array: LazyArray, what: str) -> LazyArray:
  """`array` whose reads fail as a one-line UserError naming `what` (errors.reading)."""
  def read():
    with errors.reading(what):
      return array.read()

  def read_blocks():
    with errors.reading(what):
      yield from array.read_blocks()

  def read_slice(index: Index) -> np.ndarray:
    with errors.reading(what):
      return array.read_slice(index)

  return LazyArray(array.shape, array.dtype, read, array.read_blocks and read_blocks,
                   array.read_slice and read_slice)


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
