"""Compile gqa-eval's partitioned greedy decoding for a TPU slice and time a sample with it.

The programs are the `Predictor`'s own (training/predictor.py), built on the slice's abstract
devices: the whole jit-compiled `greedy_decode` (its memory decides whether a batch fits),
and its two parts compiled alone with the same shardings -- the prefill (encoder, cache) and
one step of its loop -- whose costs give

  time per sample per chip = (prefill + targets_len * step) * chips / global batch

with each program's time from its per-device flops and bytes accessed on the chip's roofline
(XLA's own `optimal_seconds` is kept beside it).

A `DecodeLayout` is the mesh (data x model) and, for K/V heads that the model axis does not
divide, replicated K/V or the batch split over every device for attention (Pope et al.);
`search_layouts` compiles each layout of a slice at its largest fitting batch and keeps the
fastest.
"""
import dataclasses
import logging
import math
from typing import List, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from gqa_flax.models import T5Config
from gqa_flax.planning import search
from gqa_flax.planning.compiled import CompiledStep, compile_step
from gqa_flax.planning.topology import Topology, TopologyPartitioner
from gqa_flax.training import predictor, trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel


@dataclasses.dataclass(frozen=True)
class DecodeLayout:
  """A decoding layout: `num_partitions` (the model axis; data = devices / num_partitions) and
  `kv_batch_partitioned` (`Partitioner.kv_batch_partitioned`)."""
  num_partitions: int
  kv_batch_partitioned: bool = False

  def partitioner(self, topology: Topology) -> TopologyPartitioner:
    return TopologyPartitioner(self.num_partitions, kv_batch_partitioned=self.kv_batch_partitioned,
                               devices=topology.devices)

  def describe(self, topology: Topology) -> str:
    data = topology.num_devices // self.num_partitions
    kv = ", K/V batch-partitioned" if self.kv_batch_partitioned else ""
    return f"data {data} x model {self.num_partitions}{kv}"

  @property
  def gin_bindings(self) -> Tuple[str, ...]:
    """The gin bindings that make gqa-eval / gqa-infer (configs/runs/) decode this way."""
    return (f"NUM_PARTITIONS = {self.num_partitions}",
            f"Partitioner.kv_batch_partitioned = {self.kv_batch_partitioned}")

  @property
  def gin_flags(self) -> str:
    return " ".join(f"--gin.{binding.replace(' = ', '=')}" for binding in self.gin_bindings)

  def to_json(self, topology: Topology) -> dict:
    return {"layout": self.describe(topology), "num_partitions": self.num_partitions,
            "kv_batch_partitioned": self.kv_batch_partitioned}

  @classmethod
  def from_json(cls, data: dict) -> "DecodeLayout":
    return cls(data["num_partitions"], data["kv_batch_partitioned"])


def layouts(config: T5Config, topology: Topology) -> List[DecodeLayout]:
  """Every mesh data x model of the slice's devices (model axis a power of two), each with
  replicated K/V and, where the model axis does not divide the K/V heads, batch-partitioned."""
  found = []
  for model in search.powers_of_two(topology.num_devices):
    if topology.num_devices % model:
      continue
    found.append(DecodeLayout(model))
    kv_heads = (config.num_kv_heads, config.cross_num_kv_heads)
    if model > 1 and any(kv % model for kv in kv_heads):
      found.append(DecodeLayout(model, kv_batch_partitioned=True))
  return found


@dataclasses.dataclass(frozen=True)
class DecodePlan:
  """gqa-eval's greedy decoding (`program`) and its prefill and step at global `batch_size`
  in `layout` on `topology`."""
  config: T5Config
  layout: DecodeLayout
  batch_size: int
  topology: Topology
  targets_len: int
  prefill: CompiledStep
  step: CompiledStep
  program: Optional[CompiledStep]  # None: not compiled, as the prefill or step did not fit

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
    return self.program is not None and all(
        p.fits(hbm_bytes) for p in (self.prefill, self.step, self.program))

  def to_json(self) -> dict:
    """The plan's numbers (per device: bytes; per run: flops, seconds)."""
    hbm = self.topology.hbm_bytes
    programs = {"prefill": self.prefill, "step": self.step, "program": self.program}
    return {**self.layout.to_json(self.topology),
            "gin_bindings": list(self.layout.gin_bindings), "batch_per_chip": self.batch_per_chip,
            "fits": self.fits(hbm), "seconds_per_sample": self.seconds_per_sample,
            "xla_seconds_per_sample": self.xla_seconds_per_sample,
            **{name: None if p is None else dict(dataclasses.asdict(p), total_bytes=p.total_bytes)
               for name, p in programs.items()}}

  @classmethod
  def from_json(cls, config: T5Config, topology: Topology, targets_len: int, data: dict
                ) -> "DecodePlan":
    """The plan `to_json` wrote (for `config` decoding `targets_len` tokens on `topology`)."""
    def program(name):
      fields = data[name]
      return None if fields is None else CompiledStep(
          **{f.name: fields[f.name] for f in dataclasses.fields(CompiledStep)})
    return cls(config, DecodeLayout.from_json(data), data["batch_per_chip"] * topology.num_chips,
               topology, targets_len, program("prefill"), program("step"), program("program"))


def _with_shardings(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def abstract_predictor(config: T5Config, partitioner: TopologyPartitioner, inputs_len: int,
                       targets_len: int) -> predictor.Predictor:
  """gqa-eval's `Predictor` of `config` with abstract params (config.dtype, in the
  partitioner's shardings): its programs can be lowered, not run."""
  boxed = trainer.abstract_params(EncoderDecoderModel(config), {
      "encoder_input_tokens": (1, inputs_len), "decoder_input_tokens": (1, targets_len)})
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.dtype),
                        nn.meta.unbox(boxed))
  params = _with_shardings(params, partitioner.param_shardings(boxed))
  return predictor.Predictor(EncoderDecoderModel(config), params, partitioner)


def plan_decode(config: T5Config, topology: Topology, layout: DecodeLayout, batch_per_chip: int,
                inputs_len: int, targets_len: int) -> DecodePlan:
  """Compiles the prefill and one step at `batch_per_chip` per chip, then, if both fit, the
  whole decoding program."""
  partitioner = layout.partitioner(topology)
  batch_size = batch_per_chip * topology.num_chips
  partitioner.check_batch_size(batch_size)
  decoder = abstract_predictor(config, partitioner, inputs_len, targets_len)
  hbm = topology.hbm_bytes
  params_bytes = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                     for x in jax.tree.leaves(decoder.params))
  if params_bytes > hbm:  # no need to compile: it cannot fit
    too_big = CompiledStep(argument_bytes=params_bytes, oom=(
        f"the params alone need {params_bytes / 2**30:.1f} GiB per device"))
    return DecodePlan(config, layout, batch_size, topology, targets_len, too_big, too_big, None)
  data = partitioner.batch_sharding()
  inputs = jax.ShapeDtypeStruct((batch_size, inputs_len), jnp.int32, sharding=data)
  prefill_program = decoder.prefill_program(targets_len)
  encoded, cache = jax.eval_shape(prefill_program, decoder.params, inputs)
  cache = _with_shardings(cache, partitioner.cache_shardings(cache))
  tokens = jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=data)
  prefill = compile_step(prefill_program, decoder.params, inputs)
  step = compile_step(decoder.step_program(targets_len, cache), decoder.params, cache,
                      jax.ShapeDtypeStruct(encoded.shape, encoded.dtype, sharding=data),
                      inputs, tokens)
  program = None
  if prefill.fits(hbm) and step.fits(hbm):
    program = compile_step(decoder.decode_program(targets_len), decoder.params, inputs)
  return DecodePlan(config, layout, batch_size, topology, targets_len, prefill, step, program)


def best_decode_plan(config: T5Config, topology: Topology, layout: DecodeLayout,
                     inputs_len: int, targets_len: int, max_batch_per_chip: int
                     ) -> Optional[DecodePlan]:
  """The plan at the largest per-chip batch (powers of two) that fits, or None."""
  def compile_at(batch_per_chip):
    p = plan_decode(config, topology, layout, batch_per_chip, inputs_len, targets_len)
    compiled = [c for c in (p.prefill, p.step, p.program) if c is not None]
    largest = max(compiled, key=lambda s: (s.oom is not None, s.total_bytes))
    logging.info("%s-%d decoding, %s, at %d/chip: %s, %.4g s/sample", config.attention_name,
                 config.num_heads, layout.describe(topology), batch_per_chip,
                 largest.oom or f"{largest.total_bytes / 2**30:.1f} GiB per device",
                 p.seconds_per_sample)
    return p

  best, tried = search.largest_fitting(compile_at, search.powers_of_two(max_batch_per_chip),
                                       topology.hbm_bytes)
  return None if best is None else tried[best]


@dataclasses.dataclass(frozen=True)
class LayoutSearch:
  """Every layout's best plan (None: no batch fits) and the fastest of them."""
  config: T5Config
  candidates: Tuple[Tuple[DecodeLayout, Optional[DecodePlan]], ...]

  @property
  def best(self) -> Optional[DecodePlan]:
    plans = [plan for _, plan in self.candidates if plan is not None]
    return min(plans, key=lambda p: p.seconds_per_sample) if plans else None

  def to_json(self, topology: Topology) -> dict:
    best = self.best
    return {"model": self.config.attention_name, "num_heads": self.config.num_heads,
            "num_kv_heads": self.config.num_kv_heads,
            "best": None if best is None else best.to_json(),
            "candidates": [{**layout.to_json(topology), "fits": plan is not None,
                            "plan": None if plan is None else plan.to_json()}
                           for layout, plan in self.candidates]}

  @classmethod
  def from_json(cls, config: T5Config, topology: Topology, targets_len: int, data: dict
                ) -> "LayoutSearch":
    """The search `to_json` wrote, its plans' numbers as compiled then (nothing recompiled)."""
    return cls(config, tuple(
        (DecodeLayout.from_json(c), None if c["plan"] is None else
         DecodePlan.from_json(config, topology, targets_len, c["plan"]))
        for c in data["candidates"]))


def search_layouts(config: T5Config, topology: Topology, inputs_len: int, targets_len: int,
                   max_batch_per_chip: int, candidates: Optional[List[DecodeLayout]] = None
                   ) -> LayoutSearch:
  """Each of `candidates` (default: `layouts(config, topology)`) at its largest fitting batch
  up to `max_batch_per_chip`; the fastest on the roofline is `best`."""
  return LayoutSearch(config, tuple(
      (layout, best_decode_plan(config, topology, layout, inputs_len, targets_len,
                                max_batch_per_chip))
      for layout in candidates or layouts(config, topology)))
