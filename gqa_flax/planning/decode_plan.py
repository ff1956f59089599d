"""Compile greedy decoding's two programs for a TPU slice and time a sample with them.

`greedy_decode` runs the encoder and fills the cache once (prefill), then one decoder step per
output token. Each is compiled here on its own, with bfloat16 params in the run's sharding and
the cache as an input, so

  time per sample per chip = (prefill + targets_len * step) * chips / global batch

with each program's time from its per-device flops and bytes accessed on the chip's roofline
(XLA's own `optimal_seconds` is kept beside it).
"""
import dataclasses
import functools
import logging
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_flax import decoding
from gqa_flax.models import T5Config, Transformer
from gqa_flax.planning import search
from gqa_flax.planning.compiled import CompiledStep, compile_step
from gqa_flax.planning.topology import Topology, TopologyPartitioner
from gqa_flax.training import trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """Prefill and one-step programs at global `batch_size` on `topology`."""
  config: T5Config
  batch_size: int
  topology: Topology
  targets_len: int
  prefill: CompiledStep
  step: CompiledStep

  @property
  def batch_per_chip(self) -> int:
    return self.batch_size // self.topology.num_chips

  def _per_sample(self, prefill_seconds: float, step_seconds: float) -> float:
    return (prefill_seconds + self.targets_len * step_seconds) / self.batch_per_chip

  @property
  def seconds_per_sample(self) -> float:
    """Predicted time per sample per chip (the paper's T_infer) on the roofline."""
    roofline = lambda s: self.topology.generation.roofline_seconds(s.flops, s.bytes_accessed)
    return self._per_sample(roofline(self.prefill), roofline(self.step))

  @property
  def xla_seconds_per_sample(self) -> float:
    """The same from XLA's optimal_seconds."""
    return self._per_sample(self.prefill.xla_seconds, self.step.xla_seconds)

  def fits(self, hbm_bytes: int) -> bool:
    return self.prefill.fits(hbm_bytes) and self.step.fits(hbm_bytes)


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def plan_decode(config: T5Config, topology: Topology, num_partitions: int, batch_per_chip: int,
                inputs_len: int, targets_len: int) -> DecodePlan:
  """Compiles prefill (encoder + cache) and one decode step at `batch_per_chip` per chip."""
  partitioner = TopologyPartitioner(num_partitions, devices=topology.devices)
  batch_size = batch_per_chip * topology.num_chips
  partitioner.check_batch_size(batch_size)
  module = Transformer(config)
  boxed = trainer.abstract_params(EncoderDecoderModel(config), {
      "encoder_input_tokens": (1, inputs_len), "decoder_input_tokens": (1, targets_len)})
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.dtype),
                        nn.meta.unbox(boxed))
  param_shardings = partitioner.param_shardings(boxed)
  params = _with_shardings(params, param_shardings)
  data = partitioner.batch_sharding()
  inputs = jax.ShapeDtypeStruct((batch_size, inputs_len), jnp.int32, sharding=data)

  # The programs of gqa-eval's partitioned decoding (training/predictor.py): its prefill and
  # the step of its loop, with the same shardings (Partitioner.cache_shardings).
  prefill = functools.partial(decoding.prefill, module, max_decode_length=targets_len,
                              cache_shardings=partitioner.cache_shardings)
  encoded, cache = jax.eval_shape(prefill, params, inputs)
  cache_shardings = partitioner.cache_shardings(cache)
  prefill_jit = jax.jit(prefill, in_shardings=(param_shardings, data),
                        out_shardings=(data, cache_shardings))
  step_fn = functools.partial(decoding.decode_step, module, max_decode_length=targets_len)
  step_jit = jax.jit(step_fn, in_shardings=(param_shardings, cache_shardings, data, data, data),
                     out_shardings=(data, cache_shardings), donate_argnums=(1,))
  tokens = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data)
  return DecodePlan(
      config, batch_size, topology, targets_len,
      prefill=compile_step(prefill_jit, params, inputs),
      step=compile_step(step_jit, params, _with_shardings(cache, cache_shardings),
                        jax.ShapeDtypeStruct(encoded.shape, encoded.dtype, sharding=data),
                        inputs, tokens))


def best_decode_plan(config: T5Config, topology: Topology, num_partitions: int, inputs_len: int,
                     targets_len: int, max_batch_per_chip: int) -> Optional[DecodePlan]:
  """The plan at the largest per-chip batch (powers of two) that fits, or None."""
  plans = {}

  def compile_at(batch_per_chip):
    plans[batch_per_chip] = p = plan_decode(
        config, topology, num_partitions, batch_per_chip, inputs_len, targets_len)
    largest = max((p.prefill, p.step), key=lambda s: (s.oom is not None, s.total_bytes))
    logging.info("%s-%d decoding at %d/chip: %s, %.4g s/sample", config.attention_name,
                 config.num_heads, batch_per_chip,
                 largest.oom or f"{largest.total_bytes / 2**30:.1f} GiB per device",
                 p.seconds_per_sample)
    return largest

  best, _ = search.largest_fitting(compile_at, search.powers_of_two(max_batch_per_chip),
                                   topology.hbm_bytes)
  return None if best is None else plans[best]
