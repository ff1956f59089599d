"""gqa-plan: tiny's train and decode steps compiled for a TPU v4 slice through libtpu.

Memory is checked against bytes counted by hand from shapes and mesh shardings: at least the
shards' bytes, at most those bytes with the two minor dims padded to TPU tiles (8 x 128 for
32-bit, 16 x 128 for 16-bit; XLA may pick a layout that pads less). Flops are checked against
the analytic matmul + attention count (training = 3 x forward).
"""
import dataclasses
import importlib.metadata
import json
import math
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu", reason='needs the tpu extra: pip install -c constraints.txt -e ".[tpu]"')

# pylint: disable=wrong-import-position
from gqa_flax import errors
from gqa_flax.planning import decode_plan, search, table1, train_plan
from gqa_flax.planning.compiled import CompiledStep
from gqa_flax.planning.job import Job
from gqa_flax.planning.topology import TopologyPartitioner, get_topology
from gqa_flax.models import t5_1_1_config
from gqa_flax.training import gin_utils, predictor, trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel

INPUTS, TARGETS, BATCH, PARTITIONS = 32, 8, 8, 2


@pytest.fixture(scope="module")
def job():
  gin.clear_config()
  gin_utils.parse_gin(["plan/plan.gin", "models/t5_1_1/tiny.gin"], [
      f"TASK_FEATURE_LENGTHS = {{'inputs': {INPUTS}, 'targets': {TARGETS}}}",
      f"BATCH_SIZE = {BATCH}", f"NUM_PARTITIONS = {PARTITIONS}"])
  yield Job()
  gin.clear_config()


@pytest.fixture(scope="module")
def topology():
  return get_topology("v4-8")


def shard_shape(struct, mesh) -> list:
  """One device's shard: each dim divided by the sizes of the mesh axes it is split on."""
  spec = tuple(struct.sharding.spec) + (None,) * struct.ndim
  return [size // (mesh.shape[axis] if axis else 1) for size, axis in zip(struct.shape, spec)]


def shard_bytes(struct, mesh, tiled=False) -> int:
  """Bytes of one device's shard; `tiled`: minor dims padded to the TPU tile."""
  shape, itemsize = shard_shape(struct, mesh), np.dtype(struct.dtype).itemsize
  if tiled:
    shape = [1] * (2 - len(shape)) + shape
    rows = 8 * 4 // itemsize
    shape[-2:] = [-(-shape[-2] // rows) * rows, -(-shape[-1] // 128) * 128]
  return math.prod(shape) * itemsize


def assert_bytes(compiled_bytes: int, tree, mesh) -> None:
  """The shards' bytes <= compiled_bytes <= the shards' bytes padded to tiles."""
  leaves = jax.tree.leaves(tree)
  exact = sum(shard_bytes(leaf, mesh) for leaf in leaves)
  tiled = sum(shard_bytes(leaf, mesh, tiled=True) for leaf in leaves)
  assert exact <= compiled_bytes <= tiled, (exact, compiled_bytes, tiled)


def encoder_flops(cfg, inputs):
  """Forward matmul + attention flops of the encoder for one sequence (lookups: 0 flops)."""
  q = cfg.num_heads * cfg.head_dim
  per_token = 4 * 2 * cfg.emb_dim * q + 3 * 2 * cfg.emb_dim * cfg.mlp_dim + 2 * 2 * inputs * q
  return cfg.num_encoder_layers * per_token * inputs


def cross_kv_flops(cfg, inputs):
  """The decoder's cross-attention K/V projections of the encoder output, one sequence."""
  return cfg.num_decoder_layers * 2 * 2 * cfg.emb_dim * cfg.num_kv_heads * cfg.head_dim * inputs


def decoder_token_flops(cfg, inputs, targets):
  """One decoder token: self (q, o, k, v) and cross (q, o) projections, mlp, attention over
  `targets` self and `inputs` cross positions, logits."""
  q, kv, emb = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.emb_dim
  per_layer = (2 * 2 * emb * q + 2 * 2 * emb * kv + 2 * 2 * emb * q + 3 * 2 * emb * cfg.mlp_dim
               + 2 * 2 * (targets + inputs) * q)
  return cfg.num_decoder_layers * per_layer + 2 * emb * cfg.vocab_size


def test_train_step_memory_and_flops(job, topology):
  partitioner = TopologyPartitioner(PARTITIONS, devices=topology.devices)
  step = train_plan.compile_train_step(job, partitioner, BATCH)
  state, _ = train_plan.abstract_state(job, partitioner)
  batch = train_plan.abstract_batch(job.task_feature_lengths, BATCH, partitioner.batch_sharding())
  mesh = partitioner.mesh
  # Arguments: the sharded f32 params + Adafactor state, and the batch; the state is donated,
  # so all of it aliases the new state among the outputs.
  assert_bytes(step.argument_bytes, (state, batch), mesh)
  assert_bytes(step.alias_bytes, state, mesh)
  assert step.output_bytes >= step.alias_bytes
  assert step.total_bytes >= step.argument_bytes + step.temp_bytes
  assert step.fits(topology.hbm_bytes) and not step.fits(step.total_bytes - 1)
  # Flops per device x devices against 3 x the forward's matmuls and attention; the rest
  # (optimizer, softmax, norms, the replicated parts of model parallelism) is extra.
  cfg = job.model.config
  analytic = 3 * BATCH * (encoder_flops(cfg, INPUTS) + cross_kv_flops(cfg, INPUTS)
                          + TARGETS * decoder_token_flops(cfg, INPUTS, TARGETS))
  assert 1.0 <= step.flops * topology.num_devices / analytic <= 3.0
  assert step.bytes_accessed > 0 and step.xla_seconds > 0


def test_decode_steps_memory_flops_and_time(job, topology):
  config = job.model.config.replace(num_kv_heads=2)  # GQA-2: 4 query heads, 2 K/V heads
  plan = decode_plan.plan_decode(config, topology, decode_plan.DecodeLayout(PARTITIONS), 2,
                                 INPUTS, TARGETS)
  partitioner = TopologyPartitioner(PARTITIONS, devices=topology.devices)
  mesh = partitioner.mesh
  batch = 2 * topology.num_chips
  assert plan.batch_size == batch and plan.batch_per_chip == 2
  boxed = trainer.abstract_params(job.model, {
      "encoder_input_tokens": (1, INPUTS), "decoder_input_tokens": (1, TARGETS)})
  params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=s),
                        nn.meta.unbox(boxed), partitioner.param_shardings(boxed))
  tokens = jax.ShapeDtypeStruct((batch, INPUTS), np.int32, sharding=partitioner.batch_sharding())
  assert_bytes(plan.prefill.argument_bytes, (params, tokens), mesh)
  # One step reads bf16 params and the cache: per layer self K/V [batch, 2, TARGETS, 3] and
  # cross K/V [batch, 2, INPUTS, 3], batch over 'data', the 2 K/V heads over 'model'.
  kv = lambda length: jax.ShapeDtypeStruct(
      (batch, 2, length, 3), jnp.bfloat16, sharding=jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec("data", "model", None, None)))
  cache = [kv(length) for length in (TARGETS, INPUTS) for _ in range(2 * config.num_decoder_layers)]
  cache.append(jax.ShapeDtypeStruct((), jnp.int32, sharding=partitioner.replicated()))  # index
  assert plan.step.argument_bytes >= sum(shard_bytes(c, mesh) for c in cache)
  assert_bytes(plan.step.alias_bytes, cache, mesh)  # the donated cache becomes the new one
  # Prefill: encoder + cross K/V (the BOS logits are unused, so XLA drops them); a step: one
  # token attending over the whole TARGETS-long self cache.
  for step, analytic in (
      (plan.prefill, batch * (encoder_flops(config, INPUTS) + cross_kv_flops(config, INPUTS))),
      (plan.step, batch * decoder_token_flops(config, INPUTS, TARGETS))):
    assert step.fits(topology.hbm_bytes) and step.total_bytes > 0
    assert 0.8 <= step.flops * topology.num_devices / analytic <= 3.0
  # The whole decoding takes every param (the prefill's unused ones are pruned from its
  # arguments) and holds the params and the cache at once.
  assert plan.program.argument_bytes >= plan.prefill.argument_bytes
  assert plan.program.total_bytes >= plan.step.argument_bytes and plan.fits(topology.hbm_bytes)
  roofline = topology.generation.roofline_seconds
  expected = (roofline(plan.prefill.flops, plan.prefill.bytes_accessed)
              + TARGETS * roofline(plan.step.flops, plan.step.bytes_accessed)) / 2
  assert plan.seconds_per_sample == pytest.approx(expected) and expected > 0


def _abstract_params(config, partitioner):
  """The params gqa-eval's Predictor.restore puts on the mesh (its param_shardings), abstract."""
  shapes = jax.eval_shape(lambda: nn.meta.unbox(trainer.abstract_params(
      EncoderDecoderModel(config), {"encoder_input_tokens": (1, INPUTS),
                                    "decoder_input_tokens": (1, TARGETS)})))
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.dtype), shapes)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes,
                      predictor.param_shardings(partitioner, config))


@pytest.mark.parametrize("kv_batch_partitioned", [False, True])
def test_the_planned_program_is_gqa_evals_greedy_decoding(job, topology, kv_batch_partitioned):
  config = job.model.config.replace(num_kv_heads=1, cross_num_kv_heads=1)
  layout = decode_plan.DecodeLayout(4, kv_batch_partitioned)
  plan = decode_plan.plan_decode(config, topology, layout, 1, INPUTS, TARGETS)
  assert plan.program.module_name == "jit_greedy_decode"
  assert plan.prefill.module_name == "jit_prefill" and plan.step.module_name == "jit_decode_step"
  # gqa-eval's Predictor on the same partitioner (NUM_PARTITIONS = 4 binds its
  # Partitioner.num_partitions in configs/runs/eval.gin) lowers the same program.
  partitioner = layout.partitioner(topology)
  assert layout.gin_bindings == ("NUM_PARTITIONS = 4",
                                 f"Partitioner.kv_batch_partitioned = {kv_batch_partitioned}")
  params = _abstract_params(config, partitioner)
  inputs = jax.ShapeDtypeStruct((topology.num_chips, INPUTS), jnp.int32,
                                sharding=partitioner.batch_sharding())
  evals = predictor.Predictor(EncoderDecoderModel(config), params, partitioner)
  planned = decode_plan.abstract_predictor(config, partitioner, INPUTS, TARGETS)
  lowered = [p.decode_program(TARGETS).lower(params, inputs).as_text() for p in (evals, planned)]
  assert lowered[0] == lowered[1] and "sharding" in lowered[0]


def test_a_layout_whose_params_alone_exceed_hbm_is_not_compiled(job, topology):
  config = job.model.config
  small = dataclasses.replace(topology, generation=dataclasses.replace(topology.generation,
                                                                        hbm_bytes=10_000))
  plan = decode_plan.plan_decode(config, small, decode_plan.DecodeLayout(1), 1, INPUTS, TARGETS)
  assert plan.program is None and not plan.fits(small.hbm_bytes)
  assert plan.prefill.oom.startswith("the params alone need") and plan.prefill.compile_seconds == 0
  assert plan.prefill.argument_bytes > 10_000


def test_batch_partitioned_mqa_holds_a_quarter_of_the_cache_per_device(job, topology):
  """MQA on model 4 (batch 4, one per chip), inputs 2048 so that the cross-attention cache
  outweighs tiny's params: replicated K/V caches are held whole by each of the 4 devices; split
  by batch, each holds its row, and a step reads fewer bytes. The params are the same."""
  config = job.model.config.replace(num_kv_heads=1, cross_num_kv_heads=1)
  inputs = 2048
  replicated, split = [decode_plan.plan_decode(config, topology, decode_plan.DecodeLayout(4, s),
                                               1, inputs, TARGETS) for s in (False, True)]
  # The step's cache: per layer self K/V [4, TARGETS, 3] and cross K/V [4, 1, inputs, 3], bf16.
  partitioner = decode_plan.DecodeLayout(4, True).partitioner(topology)
  held = [jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=partitioner.replicated())
          for _ in range(config.num_decoder_layers)
          for shape in ((4, TARGETS, 3), (4, TARGETS, 3), (4, 1, inputs, 3), (4, 1, inputs, 3))]
  whole, tiled = (sum(shard_bytes(c, partitioner.mesh, tiled=t) for c in held) for t in (0, 1))
  saved = replicated.step.argument_bytes - split.step.argument_bytes
  assert whole * 3 / 4 <= saved <= tiled, (saved, whole, tiled)
  assert split.step.bytes_accessed < replicated.step.bytes_accessed
  assert split.seconds_per_sample < replicated.seconds_per_sample


@pytest.fixture(scope="module")
def gqa2_search(topology, tmp_path_factory):
  """(JSON path, search): tiny GQA-2's layouts (4 layouts x 3 programs at 1 per chip),
  searched as `gqa-plan --table1` searches a model and saved where it saves them."""
  path = str(tmp_path_factory.mktemp("table1") / "table1.json")
  return path, table1.SavedSearches(path, topology, INPUTS, TARGETS, 1).search("tiny", 2)


@pytest.mark.slow  # ~25 s: 4 layouts x 2 searches x 3 programs
def test_layout_search_keeps_the_fastest_that_fits_and_reports_what_does_not(topology,
                                                                             gqa2_search):
  config = t5_1_1_config("tiny", num_kv_heads=2)  # 4 heads, 2 K/V
  layouts = decode_plan.layouts(config, topology)
  assert [(l.num_partitions, l.kv_batch_partitioned) for l in layouts] == [
      (1, False), (2, False), (4, False), (4, True)]
  _, found = gqa2_search
  assert found.config == config
  assert [layout for layout, _ in found.candidates] == layouts
  assert all(plan.fits(topology.hbm_bytes) and plan.batch_per_chip == 1
             for _, plan in found.candidates)
  assert found.best.seconds_per_sample == min(p.seconds_per_sample for _, p in found.candidates)
  # HBM between the smallest and the largest layout's need: those above it fit no batch.
  need = {layout: plan.program.total_bytes for layout, plan in found.candidates}
  assert min(need.values()) < max(need.values()), need
  hbm = (min(need.values()) + max(need.values())) // 2
  small = dataclasses.replace(topology, generation=dataclasses.replace(topology.generation,
                                                                        hbm_bytes=hbm))
  tight = decode_plan.search_layouts(config, small, INPUTS, TARGETS, 1, layouts)
  for layout, plan in tight.candidates:
    assert (plan is not None) == (need[layout] <= hbm), (layout, plan)
  assert tight.best is not None and tight.best.fits(hbm)
  report = tight.to_json(small)
  assert [c["fits"] for c in report["candidates"]] == [need[l] <= hbm for l in layouts]
  assert report["best"]["layout"] == tight.best.layout.describe(small)


@pytest.mark.slow  # shares test_layout_search's search
def test_table1_searches_are_saved_as_they_finish_and_reused_with_the_same_settings(
    topology, gqa2_search, monkeypatch):
  path, found = gqa2_search
  saved = json.loads(open(path).read())
  assert saved["settings"] == {"topology": "v4-8", "inputs_len": INPUTS, "targets_len": TARGETS,
                               "max_batch_per_chip": 1, "jax": jax.__version__,
                               "libtpu": importlib.metadata.version("libtpu")}
  assert list(saved["searches"]) == ["GQA-2-Tiny"]
  # Read back: the same layouts, plans and times, nothing compiled.
  compiled = []
  monkeypatch.setattr(decode_plan, "search_layouts", lambda *args: compiled.append(args) or found)
  again = table1.SavedSearches(path, topology, INPUTS, TARGETS, 1).search("tiny", 2)
  assert not compiled
  assert again.to_json(topology) == found.to_json(topology)
  assert [l for l, _ in again.candidates] == [l for l, _ in found.candidates]
  assert again.best.seconds_per_sample == found.best.seconds_per_sample
  assert again.best.fits(topology.hbm_bytes)
  # Other settings are searched again, and the file then holds this run's searches.
  other = table1.SavedSearches(path, topology, INPUTS, 2 * TARGETS, 1)
  other.search("tiny", 2)
  assert len(compiled) == 1 and compiled[0][3] == 2 * TARGETS
  assert json.loads(open(path).read())["settings"]["targets_len"] == 2 * TARGETS
  with open(path, "w") as f:
    f.write("{")
  with pytest.raises(errors.UserError, match="table1.json is not gqa-plan's JSON"):
    table1.SavedSearches(path, topology, INPUTS, TARGETS, 1)


def test_largest_fitting_goes_top_down():
  sizes = []
  fake = lambda b: sizes.append(b) or CompiledStep(argument_bytes=100 * b)
  assert search.largest_fitting(fake, search.powers_of_two(40), 500)[0] == 4
  assert sizes == [32, 16, 8, 4]
  assert search.largest_fitting(fake, (1, 2), 50) == (None, {2: fake(2), 1: fake(1)})


def run_plan(*args):
  return subprocess.run([sys.executable, "-m", "gqa_flax.planning.plan", *args],
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow
def test_cli_plans_tiny_and_fails_in_one_line(tmp_path):
  result = run_plan(f"--json_out={tmp_path / 'plan.json'}", "--gin_file=models/t5_1_1/tiny.gin",
                    "--topology=v4-8",
                    "--gin.NUM_PARTITIONS=2", f"--gin.TASK_FEATURE_LENGTHS={{'inputs': {INPUTS}, "
                    f"'targets': {TARGETS}}}", f"--gin.BATCH_SIZE={BATCH}", "--nosearch_batch",
                    f"--decode_inputs_len={INPUTS}", f"--decode_targets_len={TARGETS}",
                    "--max_decode_batch_per_chip=1", "--decode_gqa_groups=2")
  assert result.returncode == 0, result.stderr[-2000:]
  for line in ("## Training on v4-8 (4 chips, 4 devices, mesh data=2 x model=2)",
               "| train step, global batch 8 | 2 |", "| MHA (kv heads 4) whole decoding | 1 |",
               "| MQA (kv heads 1) | data 1 x model 4, K/V batch-partitioned | 1 |",
               "| GQA-2 (kv heads 2) | data 2 x model 2 | 1 |"):
    assert line in result.stdout
  searches = json.loads((tmp_path / "plan.json").read_text())
  assert [s["num_kv_heads"] for s in searches] == [4, 1, 2]
  for found in searches:  # the fastest of the layouts that fit
    fitting = [c["plan"] for c in found["candidates"] if c["fits"]]
    assert found["best"] == min(fitting, key=lambda p: p["seconds_per_sample"])
  bad = run_plan("--gin_file=models/t5_1_1/tiny.gin", "--topology=v4-7")
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith(
      "gqa-plan: error: unknown TPU slice 'v4-7'; choose one of v3-8, ")


def test_missing_libtpu_is_one_line():
  code = ("import sys; sys.modules['libtpu'] = None; sys.argv = ['gqa-plan', '--topology=v4-8']; "
          "from gqa_flax.planning import plan; plan.console()")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == (
      'gqa-plan: error: libtpu is not installed; pip install -c constraints.txt -e ".[tpu]"')
