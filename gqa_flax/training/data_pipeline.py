"""Batches from seqio tasks, deterministic and resumable (T5X `utils.DatasetConfig`/`get_dataset`).

The feature converter (`seqio.EncDecFeatureConverter`) turns a task's inputs/targets into
encoder_input_tokens, decoder_input_tokens, decoder_target_tokens, decoder_loss_weights
[batch, length] and, when packing, encoder/decoder segment_ids and positions. Each host reads
its `shard_info` slice and batches `batch_size // num_shards` examples. With a seed the order
is a pure function of (seed, shard), so a resumed run skips `batches_consumed` batches and
sees exactly the batches an uninterrupted run would.
"""
import dataclasses
import importlib
from typing import Iterator, Mapping, Optional

import gin
import numpy as np
import seqio
import tensorflow as tf


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
      return seqio.get_mixture_or_task(self.mixture_or_task_name)
    except ValueError as e:
      raise ValueError(f"unknown seqio task or mixture {self.mixture_or_task_name!r}; set "
                       "MIXTURE_OR_TASK_NAME to a registered one or DatasetConfig.module to the "
                       "module that registers it") from e


def get_dataset(cfg: DatasetConfig, shard_info: seqio.ShardInfo, num_epochs: Optional[int] = None,
                batches_consumed: int = 0) -> tf.data.Dataset:
  """This host's batches (dicts of int32 [batch_size / num_shards, length]), repeating when
  num_epochs is None, starting after `batches_consumed` batches."""
  if cfg.batch_size % shard_info.num_shards:
    raise ValueError(f"batch_size={cfg.batch_size} is not divisible by the {shard_info.num_shards} "
                     "hosts reading the data; change BATCH_SIZE")
  ds = seqio.get_dataset(
      cfg.task().name, task_feature_lengths=dict(cfg.task_feature_lengths),
      dataset_split=cfg.split, shuffle=cfg.shuffle, num_epochs=num_epochs,
      feature_converter=seqio.EncDecFeatureConverter(pack=cfg.pack), shard_info=shard_info,
      use_cached=cfg.use_cached, seed=cfg.seed)
  ds = ds.batch(cfg.batch_size // shard_info.num_shards, drop_remainder=True)
  return ds.skip(batches_consumed).prefetch(tf.data.AUTOTUNE)


def as_numpy(ds: tf.data.Dataset) -> Iterator[Mapping[str, np.ndarray]]:
  """Batches as dicts of int32 numpy arrays."""
  for batch in ds.as_numpy_iterator():
    yield {name: value.astype(np.int32) for name, value in batch.items()}
