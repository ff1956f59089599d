"""Run by test_paper_setup.py in a process with 128 simulated CPU devices (XLA_FLAGS before jax).

Initialises T5.1.1-XXL abstractly (jax.eval_shape, nothing allocated) for each decoder K/V head
count on the command line and prints one JSON line per (kv_heads, num_partitions) with the mesh
and every parameter's shape and PartitionSpec as `Partitioner.param_shardings` makes them.
"""
import json
import sys

import flax.linen as nn
import jax

from gqa_flax.models import t5_1_1_config
from gqa_flax.training import trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner

NUM_PARTITIONS = (8, 128)  # the paper's 8 chips; 128, where MQA's joined_kv (64) does not divide


def specs(kv_heads: int, num_partitions: int, boxed) -> dict:
  partitioner = Partitioner(num_partitions=num_partitions)
  shardings = jax.tree_util.tree_flatten_with_path(partitioner.param_shardings(boxed))[0]
  shapes = dict(jax.tree_util.tree_flatten_with_path(nn.meta.unbox(boxed))[0])
  return {"kv_heads": kv_heads, "num_partitions": num_partitions,
          "mesh": dict(partitioner.mesh.shape),
          "params": {"/".join(k.key for k in path): {"shape": list(shapes[path].shape),
                                                     "spec": list(sharding.spec)}
                     for path, sharding in shardings}}


if __name__ == "__main__":
  for kv_heads in map(int, sys.argv[1:]):
    model = EncoderDecoderModel(t5_1_1_config("xxl", num_kv_heads=kv_heads))
    boxed = trainer.abstract_params(model, {"encoder_input_tokens": (1, 1),
                                            "decoder_input_tokens": (1, 1)})
    for n in NUM_PARTITIONS:
      print(json.dumps(specs(kv_heads, n, boxed)), flush=True)
