"""The paper's setup (Ainslie et al. 2023, section 3.1; T5X's T5.1.1 recipe) as the code builds it.

Expected values are written out here from T5X's formulas, not read from the code under test:
the initializers of a freshly initialised model, the dropout rate and learning rates that every
experiment and reproduction run gets from its gin files, and the partition specs of every
T5.1.1-XXL parameter under T5X's standard logical axis rules.
"""
import copy
import glob
import json
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import pytest

from gqa_flax.models import T5Config
from gqa_flax.reproduce import presets, stages
from gqa_flax.training import gin_utils
from gqa_flax.training.encoder_decoder import EncoderDecoderModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = gin_utils.CONFIGS_DIR


def _flat(tree) -> dict:
  return {"/".join(k.key for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _match(rules, path: str):
  """The one (pattern, value) rule whose pattern matches all of `path`."""
  matches = [rule for rule in rules if re.fullmatch(rule[0], path)]
  assert len(matches) == 1, f"{path}: matched {len(matches)} rules"
  return matches[0]


# --- Initial parameter scales -------------------------------------------------------------------
# Large enough for std estimates to ~0.5%, and every fan distinct: emb 256, query/out joined
# 64 * 16 = 1024, decoder K/V joined 8 * 16 = 128, mlp 768; rel_embedding [64 heads, 32 buckets].
INIT_CONFIG = T5Config(vocab_size=512, emb_dim=256, num_heads=64, head_dim=16, mlp_dim=768,
                       num_encoder_layers=1, num_decoder_layers=1, num_kv_heads=8,
                       dtype="float32")
# jax's truncated_normal draws a standard normal truncated to [-2, 2] (std 0.8796...) and rescales
# it to the target std: |x| <= 2 / 0.8796... std.
TRUNCATION = 2 / 0.87962566103423978


def t5x_initializers(cfg: T5Config):
  """(path pattern, (distribution, std)) of T5X's initializers.

  T5X examples/t5: attention kernels variance_scaling(1, 'fan_in', 'normal'), the query's
  divided by sqrt(head_dim); MLP and logits kernels variance_scaling(1, 'fan_in',
  'truncated_normal'); embedding normal(1.0); rel_embedding [heads, buckets]
  variance_scaling(1, 'fan_avg', 'uniform'); layer norm scales ones. A kernel's fan_in is its
  joined input dimension.
  """
  emb, joined = cfg.emb_dim, cfg.num_heads * cfg.head_dim
  return ((r"token_embedder/embedding", ("normal", 1.0)),
          (r".*/rel_embedding", ("uniform", math.sqrt(2 / (cfg.num_heads + 32)))),
          (r".*/scale", ("ones", 1.0)),
          (r".*/query/kernel", ("normal", 1 / math.sqrt(emb) / math.sqrt(cfg.head_dim))),
          (r".*/(key|value)/kernel", ("normal", 1 / math.sqrt(emb))),
          (r".*/out/kernel", ("normal", 1 / math.sqrt(joined))),
          (r".*/mlp/wi_[01]/kernel", ("truncated_normal", 1 / math.sqrt(emb))),
          (r".*/mlp/wo/kernel", ("truncated_normal", 1 / math.sqrt(cfg.mlp_dim))),
          (r"decoder/logits_dense/kernel", ("truncated_normal", 1 / math.sqrt(emb))))


def test_initial_parameter_scales_are_t5x_initializers():
  model = EncoderDecoderModel(INIT_CONFIG)
  shapes = {"encoder_input_tokens": (1, 4), "decoder_input_tokens": (1, 4)}
  params = _flat(nn.meta.unbox(jax.jit(lambda rng: model.init(rng, shapes))(jax.random.key(0))))
  rules = t5x_initializers(INIT_CONFIG)
  seen = set()
  for path, value in params.items():
    pattern, (kind, std) = _match(rules, path)
    seen.add(pattern)
    x = np.asarray(value, np.float64).ravel()
    if kind == "ones":
      assert (x == 1).all(), path
      continue
    # 5 standard errors of a normal sample's std (uniform and truncated ones vary less).
    assert abs(x.std() / std - 1) < 5 / math.sqrt(2 * x.size), (path, x.std(), std)
    assert abs(x.mean()) < 5 * std / math.sqrt(x.size), path
    peak = np.abs(x).max() / std
    if kind == "truncated_normal":
      assert peak <= TRUNCATION * (1 + 1e-6), path
    elif kind == "uniform":
      assert peak <= math.sqrt(3) * (1 + 1e-6), path
    else:  # untruncated: about 2.3% of a normal lies beyond the truncation point
      assert np.mean(np.abs(x) > TRUNCATION * std) > 0.01, path
  assert len(seen) == len(rules)  # every rule above applies to some parameter


# --- Dropout and learning rate of every experiment and reproduction run --------------------------
DROPOUT = {"pretrain": 0.0, "uptrain": 0.0, "finetune": 0.1}  # T5.1.1 pre-training; paper 3.1
PAPER_WARMUP, MINI_WARMUP = 10_000, 100  # T5.1.1's rsqrt warmup; the CPU-sized runs' scaled one
# configs/experiments/*.gin -> (stage, warmup steps of its rsqrt schedule)
EXPERIMENTS = {"finetune_gqa8_xxl.gin": ("finetune", None),
               "finetune_mha_large.gin": ("finetune", None),
               "finetune_mha_xxl.gin": ("finetune", None),
               "finetune_mqa_xxl.gin": ("finetune", None),
               "tiny_pretrain.gin": ("pretrain", MINI_WARMUP),
               "uptrain_xxl_gqa8.gin": ("uptrain", PAPER_WARMUP),
               "uptrain_xxl_mqa.gin": ("uptrain", PAPER_WARMUP)}
# The mini presets' runs: warmup 1000 (the best of 100, 1000, 10000 measured for the mini model;
# configs/reproduce/mini/span_corruption.gin).
PRESET_MINI_WARMUP = 1000
PRESET_WARMUP = {"paper": PAPER_WARMUP, "mini": PRESET_MINI_WARMUP, "smoke": PRESET_MINI_WARMUP}
# Fine-tuning's constant learning rate: the paper's 0.001; 0.01 from the mini presets' short
# pre-training (configs/reproduce/mini/finetune.gin).
PAPER_FINETUNE_LR = 1e-3
PRESET_FINETUNE_LR = {"paper": PAPER_FINETUNE_LR, "mini": 1e-2, "smoke": 1e-2}
TASKS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "experiments",
                                                                   "tasks", "*.gin")))


def _train_arguments(files, bindings):
  """(model, learning_rate_fn, total_steps, restore path) as gin passes them to `train`."""
  gin.clear_config()
  gin_utils.parse_gin(files, bindings)
  train_bindings = gin.get_bindings("train", resolve_references=False)
  resolve = lambda name: copy.deepcopy(train_bindings[name])  # evaluates references, as gin does
  arguments = (resolve("model"), resolve("learning_rate_fn"), resolve("total_steps"),
               resolve("checkpoint_cfg").restore.path)
  gin.clear_config()
  return arguments


def _check_run(stage, warmup, files, bindings=(), finetune_lr=PAPER_FINETUNE_LR):
  """The model's dropout and the learning rates of the run's first and last steps (and warmup)."""
  model, learning_rate_fn, total_steps, restore_path = _train_arguments(files, bindings)
  assert model.config.dropout_rate == DROPOUT[stage]
  # The step of the checkpoint the run starts from; the train step's learning rate sees the
  # global step before its update, so a run's steps are start, ..., total_steps - 1.
  start = 0 if restore_path is None else int(re.fullmatch(r".*checkpoint_(\d+)",
                                                          restore_path).group(1))
  assert stage == "pretrain" or start > 0
  if stage == "finetune":
    expected = {start: finetune_lr, total_steps - 1: finetune_lr}  # constant
  else:  # rsqrt: 1/sqrt(warmup) during warmup, then 1/sqrt(global step)
    steps = [start, total_steps - 1] + ([1, warmup - 1, warmup, 4 * warmup]
                                        if stage == "pretrain" else [])
    expected = {s: 1 / math.sqrt(max(s, warmup)) for s in steps}
  actual = {s: float(learning_rate_fn(s)) for s in expected}
  assert actual == pytest.approx(expected, rel=1e-6)


def test_every_experiment_and_preset_is_checked():
  assert sorted(EXPERIMENTS) == sorted(
      os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "experiments", "*.gin")))
  assert sorted(PRESET_WARMUP) == sorted(
      os.path.basename(p)[:-4] for p in glob.glob(os.path.join(CONFIGS, "reproduce", "*.gin")))


@pytest.mark.parametrize("name,task", [(name, task) for name, (stage, _) in EXPERIMENTS.items()
                                       for task in (TASKS if stage == "finetune" else [None])])
def test_experiment_dropout_and_learning_rate(name, task):
  stage, warmup = EXPERIMENTS[name]
  files = [f"experiments/{name}"] + ([f"experiments/tasks/{task}"] if task else [])
  _check_run(stage, warmup, files)


def _gin_arguments(argv):
  """gin files and bindings of a `python -m gqa_flax.train` command line."""
  assert argv[1:3] == ["-m", "gqa_flax.train"], argv
  args = gin_utils.rewrite_gin_args(argv[3:])
  files = [a[len("--gin_file="):] for a in args if a.startswith("--gin_file=")]
  bindings = [a[len("--gin_bindings="):] for a in args if a.startswith("--gin_bindings=")]
  assert len(files) + len(bindings) == len(args), args
  return files, bindings


@pytest.mark.parametrize("preset", sorted(PRESET_WARMUP))
def test_reproduction_runs_dropout_and_learning_rate(preset, tmp_path):
  plan = stages.Plan(presets.load_preset(preset), str(tmp_path), str(tmp_path / "data"))
  runs = [s for s in plan.stages() if "gqa_flax.train" in s.argv]
  assert {s.name.split("-")[0] for s in runs} >= {"uptrain", "finetune"}
  for run in runs:
    _check_run(run.name.split("-")[0], PRESET_WARMUP[preset], *_gin_arguments(run.argv),
               finetune_lr=PRESET_FINETUNE_LR[preset])


# --- Partition specs of T5.1.1-XXL ---------------------------------------------------------------
XXL = dict(emb=4096, heads=64, head_dim=64, mlp=10240, vocab=32128, buckets=32)
# T5X's standard logical axis rules: these go over the 'model' mesh axis, the rest is replicated.
MODEL_AXES = ("vocab", "mlp", "heads", "joined_kv")


def t5x_logical_axes(kv_heads: int):
  """(path pattern, ((logical axis, size), ...)) of XXL's parameters (T5X's names and shapes)."""
  emb, joined, kv_joined = XXL["emb"], XXL["heads"] * XXL["head_dim"], kv_heads * XXL["head_dim"]
  return ((r"token_embedder/embedding", (("vocab", XXL["vocab"]), ("embed", emb))),
          (r".*/scale", (("embed", emb),)),
          (r".*/relpos_bias/rel_embedding", (("heads", XXL["heads"]),
                                             ("relpos_buckets", XXL["buckets"]))),
          (r".*/query/kernel", (("embed", emb), ("joined_kv", joined))),
          (r"encoder/.*/(key|value)/kernel", (("embed", emb), ("joined_kv", joined))),
          (r"decoder/.*/(key|value)/kernel", (("embed", emb), ("joined_kv", kv_joined))),
          (r".*/out/kernel", (("joined_kv", joined), ("embed", emb))),
          (r".*/mlp/wi_[01]/kernel", (("embed", emb), ("mlp", XXL["mlp"]))),
          (r".*/mlp/wo/kernel", (("mlp", XXL["mlp"]), ("embed", emb))),
          (r"decoder/logits_dense/kernel", (("embed", emb), ("vocab", XXL["vocab"]))))


@pytest.fixture(scope="module")
def xxl_specs():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=128")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "partition_specs_check.py"),
                        "64", "8", "1"], env=env, cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("kv_heads", [64, 8, 1])
@pytest.mark.parametrize("num_partitions", [8, 128])
def test_xxl_partition_specs_follow_t5x_standard_rules(xxl_specs, kv_heads, num_partitions):
  """A 'model' dimension the model axis does not divide is replicated (MQA's 64 at 128, say)."""
  [result] = [r for r in xxl_specs
              if (r["kv_heads"], r["num_partitions"]) == (kv_heads, num_partitions)]
  assert result["mesh"] == {"data": 128 // num_partitions, "model": num_partitions}
  layers = 24
  assert len(result["params"]) == 1 + (2 + 9 * layers) + (3 + 14 * layers)
  rules = t5x_logical_axes(kv_heads)
  for path, param in result["params"].items():
    _, axes = _match(rules, path)
    assert param["shape"] == [size for _, size in axes], path
    expected = ["model" if name in MODEL_AXES and size % num_partitions == 0 else None
                for name, size in axes]
    assert param["spec"] == expected, path
  replicated_kv = [p for p, v in result["params"].items()
                   if re.fullmatch(r".*/(key|value)/kernel", p) and v["spec"] == [None, None]]
  assert len(replicated_kv) == (4 * layers if kv_heads * 64 % num_partitions else 0)
