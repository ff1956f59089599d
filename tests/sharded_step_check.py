"""Run by test_sharding.py in a process with 8 simulated CPU devices (XLA_FLAGS set before jax).

One Adafactor train step on a 4x2 (data x model) mesh vs the same step on one device, for
the tiny T5.1.1 with MHA and with MQA/GQA (kv_heads*head_dim not divisible by the model axis).
Prints one JSON line per attention variant with the loss difference and max param difference.
"""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from gqa_flax.models import t5_1_1_config
from gqa_flax.training import adafactor, schedules, trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner


def batch_of(rng: np.random.Generator, batch: int, inputs_len: int, targets_len: int, vocab: int):
  targets = rng.integers(2, vocab, (batch, targets_len)).astype(np.int32)
  targets[:, -3:] = 0  # padding
  return {"encoder_input_tokens": rng.integers(2, vocab, (batch, inputs_len)).astype(np.int32),
          "decoder_input_tokens": np.pad(targets[:, :-1], ((0, 0), (1, 0))),
          "decoder_target_tokens": targets,
          "decoder_loss_weights": (targets > 0).astype(np.int32)}


def compare(num_kv_heads: int) -> dict:
  config = t5_1_1_config("tiny", dtype="float32", vocab_size=64, num_kv_heads=num_kv_heads,
                         dropout_rate=0.1, num_encoder_layers=1, num_decoder_layers=1)
  model = EncoderDecoderModel(config)
  optimizer = adafactor.adafactor(min_dim_size_to_factor=8)  # factor the tiny kernels too
  lr_fn = schedules.create_learning_rate_scheduler("constant", base_learning_rate=0.1)
  partitioner = Partitioner(num_partitions=2)
  shapes = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}
  boxed = trainer.abstract_params(model, shapes)
  shardings = trainer.state_shardings(partitioner, optimizer, boxed)
  state = trainer.init_train_state(model, optimizer, shapes, shardings, seed=0)
  batch = batch_of(np.random.default_rng(0), 8, 12, 10, config.vocab_size)
  step = trainer.make_train_step(model, optimizer, lr_fn)

  single = jax.device_put(jax.device_get(state), jax.devices()[0])
  # Two steps so the second sees non-zero Adafactor accumulators.
  for _ in range(2):
    single, single_metrics = jax.jit(step)(single, jax.device_put(batch, jax.devices()[0]))
  sharded_step = trainer.jit_train_step(partitioner, step, shardings)
  for _ in range(2):
    state, metrics = sharded_step(state, partitioner.global_batch(batch, 8))
  kv_spec = state.params["decoder"]["layers_0"]["self_attention"]["key"]["kernel"].sharding.spec
  q_spec = state.params["decoder"]["layers_0"]["self_attention"]["query"]["kernel"].sharding.spec
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))),
                       state.params, single.params)
  moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(np.asarray(a) - np.asarray(b)))),
                       single.params, jax.device_get(trainer.init_train_state(
                           model, optimizer, shapes, shardings, seed=0).params))
  try:
    partitioner.check_batch_size(6)
    batch_error = ""
  except ValueError as e:
    batch_error = str(e)
  return {"batch_error": batch_error, "num_kv_heads": num_kv_heads, "devices": jax.device_count(),
          "mesh": dict(partitioner.mesh.shape),
          "loss_sharded": float(metrics["loss"]), "loss_single": float(single_metrics["loss"]),
          "max_param_diff": max(jax.tree.leaves(diffs)),
          "min_param_change": min(jax.tree.leaves(moved)),
          "key_spec": tuple(kv_spec), "query_spec": tuple(q_spec)}


if __name__ == "__main__":
  for kv_heads in map(int, sys.argv[1:]):
    print(json.dumps(compare(kv_heads)), flush=True)
