"""Batches from seqio tasks, deterministic and resumable (T5X `utils.DatasetConfig`/`get_dataset`).

The feature converter (`seqio.EncDecFeatureConverter`) turns a task's inputs/targets into
encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights
[batch, length] and, when packing, encoder/decoder segment_ids and positions. A host reads the
data shards of its `partitioning.DataLayout`, batches `batch_size // num_shards` examples of
each, concatenates them in shard order and keeps its rows of them. With a seed the
order is a pure function of (seed, shard), so a resumed run skips `batches_consumed` batches
and sees exactly the batches an uninterrupted run would. Evaluation reads one epoch, padded
to a number of batches that is the same on every host (`pad_to`), so no host waits for another.
"""
import dataclasses
import importlib
from typing import Iterator, Mapping, Optional

import gin
import numpy as np
import seqio
import tensorflow as tf

from gqa_flax import errors
from gqa_flax.data import vocab
from gqa_flax.training import gin_utils
from gqa_flax.training.partitioning import DataLayout


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DatasetConfig:
  """T5X's DatasetConfig: task, lengths, split, global batch size, order."""
  mixture_or_task_name: str
  task_feature_lengths: Mapping[str, int]
  split: str = "train"
  batch_size: int = 128
  shuffle: bool = True
  seed: Optional[int] = 0
  pack: bool = True
  use_cached: bool = False
  module: Optional[str] = None  # imported first, to register the task

  def task(self) -> seqio.Task:
    """The registered task or mixture; an unknown name fails naming the fix."""
    if self.module:
      importlib.import_module(self.module)
    try:
      task = seqio.get_mixture_or_task(self.mixture_or_task_name)
    except ValueError as e:
      raise errors.UserError(
          f"unknown seqio task or mixture {self.mixture_or_task_name!r}; set "
          "MIXTURE_OR_TASK_NAME to a registered one or DatasetConfig.module to the "
          "module that registers it") from e
    for feature in task.output_features.values():
      if isinstance(feature.vocabulary, vocab.LazyPathVocabulary):
        feature.vocabulary.check_found()
    return task


def _shard_dataset(cfg: DatasetConfig, shard_info: seqio.ShardInfo, batch_size: int,
                   num_epochs: Optional[int]) -> tf.data.Dataset:
  ds = seqio.get_dataset(
      cfg.task().name, task_feature_lengths=dict(cfg.task_feature_lengths),
      dataset_split=cfg.split, shuffle=cfg.shuffle, num_epochs=num_epochs,
      feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack), shard_info=shard_info,
      use_cached=cfg.use_cached, seed=cfg.seed)
  return ds.batch(batch_size, drop_remainder=True)


def _padding_batches(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Endless all-zero batches shaped like `ds`'s (zero loss weights: they score nothing)."""
  zeros = {name: tf.zeros(spec.shape, spec.dtype) for name, spec in ds.element_spec.items()}
  return tf.data.Dataset.from_tensors(zeros).repeat()


def get_dataset(cfg: DatasetConfig, layout: DataLayout, num_epochs: Optional[int] = None,
                batches_consumed: int = 0, pad_to: Optional[int] = None) -> tf.data.Dataset:
  """This host's batches (dicts of int32 [layout.host_batch_size, length]),
  repeating when num_epochs is None, starting after `batches_consumed` batches; with `pad_to`
  exactly that many batches (the data's first ones, then all-zero batches)."""
  if cfg.batch_size != layout.batch_size:
    raise ValueError(f"the data layout is for batch size {layout.batch_size}, the dataset's is "
                     f"{cfg.batch_size}")
  shards = []
  for shard_info in layout.shard_infos():
    ds = _shard_dataset(cfg, shard_info, layout.per_shard_batch_size, num_epochs)
    if pad_to is not None:
      ds = ds.take(pad_to).concatenate(_padding_batches(ds)).take(pad_to)
    shards.append(ds)
  ds = shards[0] if len(shards) == 1 else tf.data.Dataset.zip(tuple(shards)).map(
      lambda *batches: {name: tf.concat([b[name] for b in batches], 0) for name in batches[0]})
  if not layout.keeps_every_row:
    rows = slice(layout.offset, layout.offset + layout.host_batch_size)
    ds = ds.map(lambda batch: {name: value[rows] for name, value in batch.items()})
  return ds.skip(batches_consumed).prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset) -> Iterator[Mapping[str, np.ndarray]]:
  """Batches as dicts of int32 numpy arrays."""
  for batch in ds.as_numpy_iterator():
    yield {name: value.astype(np.int32) for name, value in batch.items()}


def from_task_gin(task_gin: str, split: str, batch_size: int) -> DatasetConfig:
  """The unshuffled, unpacked split of the task a gin file names (MIXTURE_OR_TASK_NAME,
  TASK_FEATURE_LENGTHS and its module), read after runs/pretrain.gin, whose configurables a
  training run's task file may bind. Clears gin's config first."""
  gin.clear_config()
  gin_utils.parse_gin(["runs/pretrain.gin", task_gin], [])
  return DatasetConfig(
      gin.query_parameter("%MIXTURE_OR_TASK_NAME"),
      dict(gin.query_parameter("%TASK_FEATURE_LENGTHS")), split=split, batch_size=batch_size,
      shuffle=False, seed=0, pack=False, module=gin.query_parameter("%MIXTURE_OR_TASK_MODULE"))
