"""The data layout: which shards a host reads and which of their rows it keeps.

The reference is one host holding the whole batch (`rows=[0]` of a one-row mesh), which reads
every shard: the hosts of any mesh, each keeping its rows, must put together exactly its global
batches. With `num_data_shards = 1` that is what one device reads (the reproduction's setting:
its tables do not depend on the number of devices or hosts).
"""
import functools
import itertools

import numpy as np
import pytest

from gqa_flax import errors
from gqa_flax.training import data_pipeline
from gqa_flax.training.partitioning import DataLayout, Partitioner
from tests import training_task

BATCH = 8
LENGTHS = {"inputs": 32, "targets": 32}


@functools.lru_cache(maxsize=None)  # equal layouts read equal batches (several tests share)
def _batches(layout: DataLayout, count: int = 2):
  cfg = data_pipeline.DatasetConfig(training_task.TASK_NAME, LENGTHS, batch_size=BATCH, seed=0)
  batches = data_pipeline.as_numpy(data_pipeline.get_dataset(cfg, layout))
  return [next(batches) for _ in range(count)]


def _global_batches(num_shards: int, hosts: int, data_parallel_size: int):
  """The global batches put together from `hosts` hosts holding equal contiguous row blocks."""
  rows = np.split(np.arange(data_parallel_size), hosts)
  per_host = [_batches(DataLayout.of_rows(BATCH, data_parallel_size, num_shards, list(r)))
              for r in rows]
  return [{name: np.concatenate([host[step][name] for host in per_host])
           for name in per_host[0][step]} for step in range(len(per_host[0]))]


@pytest.mark.parametrize("num_shards,hosts,data_parallel_size", [
    (1, 2, 8), (1, 4, 4), (2, 2, 8), (2, 4, 4), (4, 2, 2)])
def test_hosts_put_together_the_batches_one_host_reads(num_shards, hosts, data_parallel_size):
  reference = _batches(DataLayout.of_rows(BATCH, 1, num_shards, [0]))
  got = _global_batches(num_shards, hosts, data_parallel_size)
  for want, have in zip(reference, got):
    assert sorted(want) == sorted(have)
    for name in want:
      np.testing.assert_array_equal(have[name], want[name])
  assert any(np.any(b["decoder_target_tokens"]) for b in reference)


def test_one_shard_is_what_one_device_reads():
  # This process has one device: the default layout is one shard, kept whole.
  single = Partitioner().data_layout(BATCH)
  assert (single.num_shards, single.shard_ids, single.offset, single.host_batch_size) == \
      (1, (0,), 0, BATCH)
  reference = _batches(single)
  for want, have in zip(reference, _global_batches(1, 2, 8)):
    np.testing.assert_array_equal(have["decoder_target_tokens"], want["decoder_target_tokens"])


def test_default_layout_reads_one_shard_per_row():
  for rows in ([0, 1], [2, 3]):
    layout = DataLayout.of_rows(BATCH, 4, 4, rows)
    assert layout.shard_ids == tuple(rows) and layout.keeps_every_row


@pytest.mark.parametrize("data_parallel_size,num_shards", list(itertools.product(
    [1, 2, 4, 8], [1, 2, 4, 8])))
def test_each_row_keeps_its_examples(data_parallel_size, num_shards):
  # Hand check: the host of row r keeps global examples [r, r + 1) * BATCH / data_parallel_size,
  # shard j holding examples [j, j + 1) * BATCH / num_shards.
  per_row, per_shard = BATCH // data_parallel_size, BATCH // num_shards
  for row in range(data_parallel_size):
    layout = DataLayout.of_rows(BATCH, data_parallel_size, num_shards, [row])
    examples = np.concatenate([np.arange(j * per_shard, (j + 1) * per_shard)
                               for j in layout.shard_ids])
    kept = examples[layout.offset:layout.offset + layout.host_batch_size]
    np.testing.assert_array_equal(kept, np.arange(row * per_row, (row + 1) * per_row))
    assert len(layout.shard_ids) == max(1, num_shards // data_parallel_size)


def test_shards_that_do_not_divide_the_batch_are_refused_naming_the_setting():
  with pytest.raises(errors.UserError, match="Partitioner.num_data_shards=3"):
    DataLayout.of_rows(BATCH, 1, 3, [0])
