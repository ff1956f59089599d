"""Run by test_sharded_load.py in a process with 8 simulated CPU devices (XLA_FLAGS set before jax).

  python tests/sharded_load_check.py NUM_PARTITIONS PATH...

For each checkpoint PATH: `checkpoints.load_sharded` onto the partitioner's ('data', 'model')
mesh in bfloat16, against `checkpoints.load` (numpy) cast to bfloat16. Prints one JSON line per
PATH: the params that differ, the params whose every device shard is partial (no device holds
the whole array), and the sharded params that were read whole instead of by slices.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gqa_flax import checkpoints
from gqa_flax.checkpoints import arrays
from gqa_flax.checkpoints.arrays import flatten
from gqa_flax.training import trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner

SHAPES = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}


def _reads_recorded() -> list:
  """Patches LazyArray.read_index to note each (shape, rows, whole read?) it serves."""
  reads, read_index = [], arrays.LazyArray.read_index

  def recorded(self, index):
    reads.append((self.shape, self.read_slice is None and self.read_blocks is not None))
    return read_index(self, index)

  arrays.LazyArray.read_index = recorded
  return reads


def check(path: str, partitioner: Partitioner, reads: list) -> dict:
  def shardings_fn(config):
    return partitioner.param_shardings(trainer.abstract_params(EncoderDecoderModel(config), SHAPES))

  reads.clear()
  loaded = checkpoints.load_sharded(path, shardings_fn, dtype=jnp.bfloat16)
  whole_reads = sorted({str(shape) for shape, whole in reads if whole})
  _, expected = checkpoints.load(path)
  got, expected = flatten(loaded.params), flatten(expected)
  differ = [name for name, value in expected.items()
            if got[name].dtype != jnp.bfloat16 or got[name].shape != value.shape
            or not np.array_equal(np.asarray(jax.device_get(got[name]), np.float32),
                                  value.astype(jnp.bfloat16).astype(np.float32))]
  partial = sorted(name for name, array in got.items()
                   if all(shard.data.shape != array.shape for shard in array.addressable_shards))
  return {"path": path, "params": len(got), "differ": differ, "partial": partial,
          "whole_reads": whole_reads, "devices": jax.device_count(),
          "mesh": dict(partitioner.mesh.shape)}


def main() -> None:
  partitioner = Partitioner(num_partitions=int(sys.argv[1]))
  reads = _reads_recorded()
  for path in sys.argv[2:]:
    print(json.dumps(check(path, partitioner, reads)), flush=True)


if __name__ == "__main__":
  main()
