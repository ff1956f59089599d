"""Multi-head -> GQA-G / MQA checkpoint conversion (paper section 2.1, Figure 4 ablation).

Only the decoder's `self_attention` and `encoder_decoder_attention` key/value kernels change,
from [emb, H*head_dim] to [emb, G*head_dim]; everything else is copied bit for bit. Groups are
contiguous (query head h -> group h // (H/G)), as at run time:

  mean     each group's K/V projection is the mean of its heads' projections;
  first    each group keeps its first head's projection;
  random   fresh weights from the model's own key/value initializer (seeded per array);
  grouped  mean pooling of groups of alike heads instead of neighbouring ones (AsymGQA,
           Chen et al. 2024; QCQA, Joshi et al. 2024, for decoder-only models): the heads
           are first permuted so that each contiguous group holds heads whose key and value
           kernels are alike (`balanced_groups`), an exact move on the multi-head model when
           the query, key, value and output projections of a head, and in self-attention
           its row of the relative position bias, move together. T5.1.1 shares one bias
           table across the decoder's layers, so self-attention takes one permutation for
           every layer (from the kernels' similarity summed over layers); cross-attention,
           which has no bias, one per layer. The permutations are in the metadata.
  aligned  `grouped` with a similarity that rotations do not change, then each head rotated
           onto its group's mean before the mean is taken (`align.py`: orthogonal
           Procrustes; the query and key projections of a head share one rotation, its value
           and output projections another, so the multi-head model is unchanged before
           pooling), in the metric of the key/value projections' inputs on calibration
           examples (`grams`, `calibration.py`; without them, of the kernels themselves).

Streaming: each array is read, converted and written on its own, in row blocks of about
`arrays.BLOCK_BYTES` where its reader can read blocks (`LazyArray`s written by Orbax through
`orbax_format.LazyArrayHandler`), so memory is bounded by a few blocks (a few of the largest
arrays for sources read whole), not by the checkpoint. SRC and DST may be local or URLs
(`gs://`). A local DST is written to a temporary sibling `DST.tmp-<host>-<pid>` and renamed at
the end (a later conversion removes the siblings of writers that died); a URL DST is
written in place (object stores have no directory rename), where Orbax commits the step with
its commit_success.txt last and every reader here and in Orbax skips a step without it, so an
interrupted conversion never looks complete.
Optimizer state is not carried over (uptraining restarts it, as T5X's sparse upcycling does).
"""
import functools
import glob
import itertools
import os
import re
import shutil
import socket
import subprocess
import sys
import zlib
from typing import Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from flax.linen import meta
from tqdm import tqdm

from gqa_flax import errors, processes
from gqa_flax.checkpoints import align, orbax_format, paths
from gqa_flax.checkpoints.arrays import LazyArray, mapped, unflatten
from gqa_flax.checkpoints.reader import CheckpointSource, open_checkpoint
from gqa_flax.models.attention import MultiHeadDotProductAttention
from gqa_flax.models.config import T5Config

METHODS = ("mean", "first", "random", "grouped", "aligned")
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
_KV_KERNEL = re.compile(
    r"decoder/layers_\d+/(self_attention|encoder_decoder_attention)/(key|value)/kernel")
_ATTENTION_KERNEL = re.compile(
    r"decoder/layers_(\d+)/(self_attention|encoder_decoder_attention)/(query|key|value|out)/kernel")
_DECODER_BIAS = "decoder/relpos_bias/rel_embedding"


def _grouped(kernel: np.ndarray, num_kv_heads: int, head_dim: int) -> np.ndarray:
  """[emb, H*head_dim] -> [emb, G, H/G, head_dim] (contiguous groups of heads)."""
  emb, joined = kernel.shape
  return kernel.reshape(emb, num_kv_heads, joined // head_dim // num_kv_heads, head_dim)


def mean_pool_kv(kernel: np.ndarray, num_kv_heads: int, head_dim: int) -> np.ndarray:
  """[emb, H*head_dim] -> [emb, G*head_dim]: the mean of each group's heads."""
  grouped = _grouped(kernel, num_kv_heads, head_dim)
  mean = grouped.astype(np.float64).mean(axis=2).astype(kernel.dtype)
  return mean.reshape(kernel.shape[0], -1)


def first_head_kv(kernel: np.ndarray, num_kv_heads: int, head_dim: int) -> np.ndarray:
  """[emb, H*head_dim] -> [emb, G*head_dim]: each group's first head."""
  return np.ascontiguousarray(_grouped(kernel, num_kv_heads, head_dim)[:, :, 0]).reshape(
      kernel.shape[0], -1)


def random_kv(name: str, config: T5Config, num_kv_heads: int, seed: int) -> np.ndarray:
  """A fresh [emb, G*head_dim] K/V kernel from the model's own initializer.

  The PRNG key is `fold_in(PRNGKey(seed), crc32(name))`, so each array gets its own draw.
  """
  rng = jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))
  layer = MultiHeadDotProductAttention(config.num_heads, num_kv_heads, config.head_dim)
  x = jnp.zeros((1, 1, config.emb_dim), jnp.float32)
  params = meta.unbox(layer.init(rng, x, x, None)["params"])
  return np.asarray(params[name.split("/")[-2]]["kernel"])


def balanced_groups(similarity: np.ndarray, num_groups: int) -> np.ndarray:
  """A permutation [H] of the heads whose contiguous blocks of H/G heads are groups of alike
  heads, from their [H, H] `similarity`: greedily, the most alike pair of heads not yet
  grouped starts a group, which takes the head most alike its members on average until it
  has H/G. Identity when each group is one head."""
  heads = len(similarity)
  size = heads // num_groups
  if size == 1:
    return np.arange(heads)
  left, order = set(range(heads)), []
  while left:
    pairs = [(similarity[a, b], -a, -b) for a in left for b in left if a < b]
    _, a, b = max(pairs)
    group = [-a, -b]
    while len(group) < size:
      group.append(max(left - set(group), key=lambda h: (similarity[h, group].mean(), -h)))
    order += group
    left -= set(group)
  return np.asarray(order)


HeadSimilarity = Callable[[np.ndarray, int, str], np.ndarray]


def _cosines(kernel: np.ndarray, head_dim: int, attention: str) -> np.ndarray:
  del attention
  return kv_head_cosines(kernel, head_dim)


def _kv_similarity(source: CheckpointSource, layer: str, kind: str,
                   head_similarity: HeadSimilarity) -> np.ndarray:
  """[H, H]: the similarity of the heads' key kernels plus that of their values."""
  return sum(head_similarity(np.asarray(source.arrays[f"{layer}/{kind}/{kv}/kernel"].read()),
                             source.config.head_dim, f"{layer}/{kind}") for kv in ("key", "value"))


def head_permutations(source: CheckpointSource, num_kv_heads: int, cross_num_kv_heads: int,
                      head_similarity: HeadSimilarity = _cosines) -> Dict[str, np.ndarray]:
  """{'self_attention': one permutation for every decoder layer (their shared relative
  position bias moves with it), 'encoder_decoder_attention/<layer>': one per layer}, grouping
  heads alike by `head_similarity(kernel, head_dim, 'decoder/layers_<i>/<attention>')`
  ([H, H]; default: the kernels' cosines)."""
  similarity = functools.partial(_kv_similarity, source, head_similarity=head_similarity)
  layers = [f"decoder/layers_{i}" for i in range(source.config.num_decoder_layers)]
  permutations = {"self_attention": balanced_groups(
      sum(similarity(layer, "self_attention") for layer in layers), num_kv_heads)}
  for i, layer in enumerate(layers):
    permutations[f"encoder_decoder_attention/{i}"] = balanced_groups(
        similarity(layer, "encoder_decoder_attention"), cross_num_kv_heads)
  return permutations


def permute_heads(name: str, array: LazyArray, permutation: np.ndarray,
                  head_dim: int) -> LazyArray:
  """`array` with its heads in the order `permutation`: the column blocks of a query, key or
  value kernel [emb, H*head_dim] (row by row), the row blocks of an output kernel
  [H*head_dim, emb] or the rows of a bias table [H, buckets] (read whole)."""
  heads = len(permutation)
  if name.endswith("/out/kernel") or name == _DECODER_BIAS:
    rows = 1 if name == _DECODER_BIAS else head_dim
    return LazyArray(array.shape, array.dtype, lambda: np.ascontiguousarray(
        array.read().reshape(heads, rows, -1)[permutation]).reshape(array.shape))
  return mapped(array, lambda kernel: np.ascontiguousarray(
      kernel.reshape(len(kernel), heads, head_dim)[:, permutation]).reshape(kernel.shape))


def _permuted(source: CheckpointSource, permutations: Dict[str, np.ndarray]
              ) -> Dict[str, LazyArray]:
  """The source's arrays with the decoder's attention heads permuted (`head_permutations`)."""
  arrays = dict(source.arrays)
  for name, array in source.arrays.items():
    match = _ATTENTION_KERNEL.fullmatch(name)
    if match or name == _DECODER_BIAS:
      kind = "self_attention" if name == _DECODER_BIAS or match.group(2) == "self_attention" \
          else f"encoder_decoder_attention/{match.group(1)}"
      arrays[name] = permute_heads(name, array, permutations[kind], source.config.head_dim)
  return arrays


def _aligned(arrays: Dict[str, LazyArray], config: T5Config, num_kv_heads: int,
             cross_num_kv_heads: int, grams: Dict[str, np.ndarray]) -> Dict[str, LazyArray]:
  """`arrays` (heads already grouped) with each decoder attention's heads rotated onto their
  group's mean in the metric of its key/value inputs' `grams` (identity where absent): the
  key rotation applied to query and key, the value rotation to value and (transposed) to the
  output rows (`align.py`)."""
  arrays = dict(arrays)
  for i in range(config.num_decoder_layers):
    for kind, groups in (("self_attention", num_kv_heads),
                         ("encoder_decoder_attention", cross_num_kv_heads)):
      prefix = f"decoder/layers_{i}/{kind}"
      rotations = {kv: align.group_rotations(np.asarray(arrays[f"{prefix}/{kv}/kernel"].read()),
                                             groups, config.head_dim, grams.get(prefix))
                   for kv in ("key", "value")}
      for projection, kv, rotate in (("query", "key", align.rotate_columns),
                                     ("key", "key", align.rotate_columns),
                                     ("value", "value", align.rotate_columns),
                                     ("out", "value", align.rotate_rows)):
        name = f"{prefix}/{projection}/kernel"
        arrays[name] = _rotated(arrays[name], rotations[kv], rotate)
  return arrays


def _rotated(array: LazyArray, rotations: np.ndarray,
             rotate: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> LazyArray:
  return LazyArray(array.shape, array.dtype, lambda: rotate(np.asarray(array.read()), rotations))


def _converted(name: str, array: LazyArray, config: T5Config, num_kv_heads: int, method: str,
               seed: int) -> LazyArray:
  """The LazyArray of the GQA kernel made from the multi-head kernel `array`."""
  source_heads = array.shape[1] // config.head_dim
  if source_heads % num_kv_heads:
    raise errors.UserError(
        f"{name} has {source_heads} key/value heads, which {num_kv_heads} groups "
        f"do not divide")
  shape = (array.shape[0], num_kv_heads * config.head_dim)
  if method == "random":
    return LazyArray(shape, array.dtype,
                     lambda: random_kv(name, config, num_kv_heads, seed).astype(array.dtype))
  pool = first_head_kv if method == "first" else mean_pool_kv
  return mapped(array, lambda kernel: pool(kernel, num_kv_heads, config.head_dim), shape)


def _cast(array: LazyArray, dtype: Optional[np.dtype]) -> LazyArray:
  """Floating arrays cast to `dtype` (None: kept as stored)."""
  if dtype is None or array.dtype == dtype or not jnp.issubdtype(array.dtype, jnp.floating):
    return array
  return mapped(array, lambda value: value.astype(dtype), dtype=dtype)


def convert_arrays(source: CheckpointSource, num_kv_heads: int,
                   cross_num_kv_heads: Optional[int] = None, method: str = "mean", seed: int = 0,
                   dtype: Optional[str] = None, grams: Optional[Dict[str, np.ndarray]] = None):
  """(GQA T5Config, {name: LazyArray}, head permutations of `grouped` / `aligned` or {}) of
  `source` converted; nothing is read yet but, for those two, the decoder's key/value
  kernels. `aligned` groups and rotates heads in the metric of `grams`
  ({'decoder/layers_<i>/<attention>': X^T X of its key/value inputs}, `calibration.py`;
  None: the kernels' own)."""
  if method not in METHODS:
    raise errors.UserError(f"method {method!r} is not one of {', '.join(METHODS)}")
  if dtype is not None and dtype not in DTYPES:
    raise errors.UserError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
  cross = num_kv_heads if cross_num_kv_heads is None else cross_num_kv_heads
  config = source.config.replace(num_kv_heads=num_kv_heads, cross_num_kv_heads=cross)
  permutations, sources = {}, source.arrays
  if method in ("grouped", "aligned"):
    if source.config.num_kv_heads != source.config.num_heads or \
        source.config.cross_num_kv_heads != source.config.num_heads:
      raise errors.UserError(f"--method {method} converts a multi-head checkpoint; this one "
                             f"has {source.config.attention_name} attention")
    grams = grams or {}
    similarity = _cosines if method == "grouped" else (
        lambda kernel, head_dim, attention: align.rotation_invariant_similarity(
            kernel, head_dim, grams.get(attention)))
    permutations = head_permutations(source, num_kv_heads, cross, similarity)
    sources = _permuted(source, permutations)
    if method == "aligned":
      sources = _aligned(sources, source.config, num_kv_heads, cross, grams)
  arrays = {}
  for name, array in sources.items():
    match = _KV_KERNEL.fullmatch(name)
    if match:
      groups = num_kv_heads if match.group(1) == "self_attention" else cross
      array = _converted(name, array, source.config, groups, method, seed)
    arrays[name] = _cast(array, DTYPES.get(dtype))
  return config, arrays, permutations


def kv_head_cosines(kernel: np.ndarray, head_dim: int) -> np.ndarray:
  """[H, H] cosine similarities between the heads of a key/value kernel [emb, H*head_dim],
  each head's [emb, head_dim] block taken as one vector."""
  emb, joined = kernel.shape
  heads = kernel.reshape(emb, joined // head_dim, head_dim).transpose(1, 0, 2).reshape(
      joined // head_dim, -1).astype(np.float64)
  unit = heads / np.maximum(np.linalg.norm(heads, axis=1, keepdims=True), 1e-30)
  return unit @ unit.T


def kv_head_similarity(source: CheckpointSource) -> Dict[str, float]:
  """{decoder key/value kernel name: the mean cosine similarity of its pairs of heads}: how
  alike the heads that conversion pools are (near 0: unrelated heads; 1: identical ones)."""
  similarity = {}
  for name, array in source.arrays.items():
    if _KV_KERNEL.fullmatch(name):
      cosines = kv_head_cosines(np.asarray(array.read()), source.config.head_dim)
      heads = len(cosines)
      similarity[name] = float((cosines.sum() - np.trace(cosines)) / (heads * (heads - 1)))
  return similarity


def _with_progress(arrays: Dict[str, LazyArray], bar: tqdm) -> Dict[str, LazyArray]:
  """The same arrays, advancing `bar` by the bytes of each block read."""
  done = itertools.count(1)

  def tracked(array):
    unread = array.nbytes

    def update(value):
      nonlocal unread
      bar.update(value.nbytes)
      unread -= value.nbytes
      if not unread:
        bar.set_postfix_str(f"{next(done)}/{len(arrays)} arrays", refresh=False)
      return value

    return mapped(array, update)

  return {name: tracked(array) for name, array in arrays.items()}


def _temporary_sibling(dst: str) -> str:
  """Where this process writes a local DST before renaming it: `DST.tmp-<host>-<pid>`."""
  return f"{dst}.tmp-{socket.gethostname()}-{os.getpid()}"


_REMOVE_AFTER_EXIT = """
import os, shutil, sys, time
pid, path = int(sys.argv[1]), sys.argv[2]
for _ in range(12000):  # up to 10 minutes
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    break
  time.sleep(0.05)
shutil.rmtree(path, ignore_errors=True)
"""


def discard_temporary_at_exit(dst: str) -> None:
  """Removes this process's temporary sibling of a local DST once this process has ended
  (its writer threads with it), from a small detached process: call, then exit at once."""
  if not paths.is_url(dst):
    subprocess.Popen(  # pylint: disable=consider-using-with
        [sys.executable, "-c", _REMOVE_AFTER_EXIT, str(os.getpid()),
         _temporary_sibling(paths.absolute(dst))], start_new_session=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _remove_stale_temporaries(dst: str) -> None:
  """Removes the temporary siblings of DST whose writer, a process of this host, is dead (a
  conversion killed by SIGKILL or a crash)."""
  for path in glob.glob(f"{glob.escape(dst)}.tmp-*"):
    match = re.fullmatch(rf"{re.escape(dst)}\.tmp-(.+)-(\d+)", path)
    if (match and match.group(1) == socket.gethostname()
        and not processes.alive(int(match.group(2)))):
      shutil.rmtree(path, ignore_errors=True)


def _write_committed(dst: str, write: Callable[[str], None]) -> None:
  """`write(directory)` so that DST never looks complete before it is; replaces DST."""
  if paths.is_url(dst):  # In place: Orbax commits the step last (commit_success.txt).
    if epath.Path(dst).exists():
      epath.Path(dst).rmtree()
    write(dst)
    return
  _remove_stale_temporaries(dst)
  tmp = _temporary_sibling(dst)
  try:
    write(tmp)
    if os.path.exists(dst):
      shutil.rmtree(dst)
    os.rename(tmp, dst)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def convert_checkpoint(src: str, dst: str, num_kv_heads: int,
                       cross_num_kv_heads: Optional[int] = None, method: str = "mean",
                       seed: int = 0, dtype: Optional[str] = None, overwrite: bool = False,
                       progress: bool = True, grams: Optional[Dict[str, np.ndarray]] = None,
                       calibration: Optional[dict] = None) -> T5Config:
  """Converts checkpoint `src` (any supported format) into the Orbax checkpoint `dst`.

  Returns the GQA config. `dst` appears, or is committed (URL), only once complete. `grams`:
  as in `convert_arrays`; `calibration`: what they were computed on, for the metadata.
  """
  src_abs, dst_abs = paths.absolute(src), paths.absolute(dst)
  if epath.Path(dst_abs).exists() and not overwrite:
    raise FileExistsError(f"DST {dst} exists; pass --overwrite to replace it")
  if (dst_abs + os.sep).startswith(src_abs + os.sep) or (src_abs + os.sep).startswith(dst_abs + os.sep):
    raise errors.UserError(f"DST {dst} overlaps SRC {src}; the source is never modified")
  source = open_checkpoint(src)
  config, arrays, permutations = convert_arrays(source, num_kv_heads, cross_num_kv_heads,
                                                method, seed, dtype, grams)
  step = source.step or 0
  metadata = {"source_path": src_abs, "source_format": source.format, "source_step": source.step,
              "method": method, "num_kv_heads": config.num_kv_heads,
              "cross_num_kv_heads": config.cross_num_kv_heads, "seed": seed}
  if calibration:
    metadata["calibration"] = calibration
  if permutations:
    metadata["head_permutations"] = {kind: permutation.tolist()
                                     for kind, permutation in permutations.items()}
  total = sum(array.nbytes for array in arrays.values())

  def write(directory):
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"{config.attention_name}",
              disable=not progress) as bar:
      orbax_format.save(directory, step, unflatten(_with_progress(arrays, bar)), config, metadata)

  _write_committed(dst_abs, write)
  return config
