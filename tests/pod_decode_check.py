"""Run by test_pod.py on the simulated pod and in one process with 8 devices.

For MHA, GQA-2 and MQA (8 query heads) and NUM_PARTITIONS 4 and 8: greedy and beam tokens of
the partitioned `Predictor` and of single-device decoding (the same params on one local
device), and how the params and caches are laid out; the same with batch-partitioned
attention (`kv_batch_partitioned`) where the model axis does not divide the K/V heads; then a
batch of 3 on a data axis of 8.
Prints one JSON line per case (process 0 only, after checking that every process decoded the
same tokens).
"""
import argparse
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from gqa_flax import decoding, pod
from gqa_flax.models import t5_1_1_config
from gqa_flax.training import predictor
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner

BATCH, INPUTS_LEN, DECODE_LEN, BEAMS = 8, 12, 8, 3


def _config(kv_heads):
  return t5_1_1_config("tiny", emb_dim=32, num_heads=8, head_dim=4, mlp_dim=64, vocab_size=128,
                       num_encoder_layers=1, num_decoder_layers=1, num_kv_heads=kv_heads,
                       dtype="float32")


def _params(config):
  """Deterministic params, sharpened (x4) so that the beams differ and argmax ties are rare."""
  module = EncoderDecoderModel(config).module
  tokens = jnp.ones((1, 4), jnp.int32)
  params = nn.meta.unbox(module.init(jax.random.key(0), tokens, tokens, tokens)["params"])
  return jax.tree.map(lambda x: np.asarray(x) * 4.0, params)


def _fully_held(array) -> bool:
  """Whether some device holds all of `array`."""
  return any(shard.data.shape == array.shape for shard in array.addressable_shards)


def _inputs(vocab_size):
  inputs = np.random.default_rng(1).integers(2, vocab_size, (BATCH, INPUTS_LEN))
  inputs[:, -3:] = 0  # padding
  return inputs.astype(np.int32)


@functools.lru_cache()
def _single_device(kv_heads: int):
  """(greedy tokens, best beam's tokens) of the params on one local device."""
  config = _config(kv_heads)
  module = EncoderDecoderModel(config).module
  local = jax.local_devices()[0]
  params = jax.device_put(_params(config), local)
  inputs = jax.device_put(_inputs(config.vocab_size), local)
  return (np.asarray(decoding.greedy_decode(module, params, inputs, DECODE_LEN)),
          np.asarray(decoding.beam_search(module, params, inputs, DECODE_LEN, BEAMS)[0][:, 0]))


def check(kv_heads: int, num_partitions: int, kv_batch_partitioned: bool = False) -> dict:
  config = _config(kv_heads)
  model = EncoderDecoderModel(config)
  inputs = _inputs(config.vocab_size)
  partitioner = Partitioner(num_partitions, kv_batch_partitioned=kv_batch_partitioned)
  partitioned = predictor.from_host_params(model, _params(config), partitioner)
  greedy = partitioned.predict(inputs, DECODE_LEN)
  beam = partitioned.predict(inputs, DECODE_LEN, beam_size=BEAMS)
  ref_greedy, ref_beam = _single_device(kv_heads)
  cache = partitioned.decode_cache(inputs, DECODE_LEN)
  self_key = cache["decoder"]["layers_0"]["self_attention"]["cached_key"]
  cross_key = cache["decoder"]["layers_0"]["encoder_decoder_attention"]["cached_key"]
  q_kernel = partitioned.params["decoder"]["layers_0"]["self_attention"]["query"]["kernel"]
  kv_kernel = partitioned.params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"]
  everywhere = np.asarray(multihost_utils.process_allgather(greedy))
  return {"kv_heads": kv_heads, "num_partitions": num_partitions,
          "processes": jax.process_count(), "devices": jax.device_count(),
          "greedy_equal": bool((greedy == ref_greedy).all()),
          "beam_equal": bool((beam == ref_beam).all()),
          "same_on_every_process": bool((everywhere == greedy[None]).all()),
          "beam_differs_from_greedy": bool((beam != greedy).any()),
          "nonzero_tokens": int((greedy > 0).sum()),
          "query_kernel_fully_held": _fully_held(q_kernel),
          "key_kernel_fully_held": _fully_held(kv_kernel),
          "self_cache_shape": list(self_key.shape),
          "self_cache_rows_per_device": self_key.addressable_shards[0].data.shape[0],
          "cross_cache_rows_per_device": cross_key.addressable_shards[0].data.shape[0],
          "self_cache_spec": [str(a) for a in self_key.sharding.spec],
          "self_cache_fully_held": _fully_held(self_key),
          "cross_cache_fully_held": _fully_held(cross_key)}


def check_uneven_batch(kv_heads: int, rows: int) -> dict:
  """`rows` inputs on a mesh whose data axis (all devices, num_partitions 1) does not divide
  them: the Predictor pads the batch and returns the rows' own tokens."""
  config = _config(kv_heads)
  partitioned = predictor.from_host_params(EncoderDecoderModel(config), _params(config),
                                           Partitioner(1))
  greedy = partitioned.predict(_inputs(config.vocab_size)[:rows], DECODE_LEN)
  return {"kv_heads": kv_heads, "rows": rows, "data_parallel_size": jax.device_count(),
          "shape": list(greedy.shape),
          "greedy_equal": bool((greedy == _single_device(kv_heads)[0][:rows]).all())}


def main(argv):
  parser = argparse.ArgumentParser()
  pod.add_flags(parser)
  pod.initialize(**pod.flags_of(parser.parse_args(argv)))
  for num_partitions in (4, 8):
    for kv_heads in (8, 2, 1):
      result = check(kv_heads, num_partitions)
      if pod.is_writer():
        print("RESULT " + json.dumps(result), flush=True)
  # Batch-partitioned attention (Pope et al.): K/V heads the model axis does not divide.
  for num_partitions, kv_heads in ((4, 1), (8, 1), (8, 2)):
    result = check(kv_heads, num_partitions, kv_batch_partitioned=True)
    if pod.is_writer():
      print("SPLIT " + json.dumps(result), flush=True)
  uneven = check_uneven_batch(2, rows=3)
  if pod.is_writer():
    print("UNEVEN " + json.dumps(uneven), flush=True)


if __name__ == "__main__":
  main(sys.argv[1:])
