"""Training on real text (lines of the GQA paper): the loss falls, a SIGKILLed run resumes to
exactly the uninterrupted params, uptraining restores a converted checkpoint with fresh
optimizer state, and bad configuration fails before any compute."""
import json
import os
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from gqa_flax.checkpoints import orbax_format
from gqa_flax.models import t5_1_1_config
from gqa_flax.training import adafactor, data_pipeline, gin_utils, schedules, trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner
from tests import training_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
LENGTHS = {"inputs": 32, "targets": 32}
BINDINGS = [f"MIXTURE_OR_TASK_NAME = '{training_task.TASK_NAME}'",
            "MIXTURE_OR_TASK_MODULE = 'tests.training_task'",
            f"TASK_FEATURE_LENGTHS = {LENGTHS}", "BATCH_SIZE = 8",
            f"t5_1_1_config.vocab_size = {training_task.VOCAB_SIZE}",
            "t5_1_1_config.num_encoder_layers = 1", "t5_1_1_config.num_decoder_layers = 1",
            "create_learning_rate_scheduler.warmup_steps = 10", "train.stats_period = 1",
            "SaveCheckpointConfig.period = 4", "SaveCheckpointConfig.steps = [6, 39]"]
STEPS = 40


def _cli(model_dir, steps=STEPS, extra=()):
  args = [sys.executable, "-m", "gqa_flax.train", "--gin_file=models/t5_1_1/tiny.gin",
          "--gin_file=runs/pretrain.gin", f"--gin.MODEL_DIR='{model_dir}'",
          f"--gin.TRAIN_STEPS={steps}"] + [f"--gin_bindings={b}" for b in BINDINGS + list(extra)]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, XLA_FLAGS=FAST_XLA,
             TF_CPP_MIN_LOG_LEVEL="3")
  return args, env


def _run(model_dir, **kw):
  args, env = _cli(model_dir, **kw)
  return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def _params(model_dir, step):
  state = ocp.PyTreeCheckpointer().restore(os.path.join(model_dir, f"checkpoint_{step}", "state"))
  return state


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  model_dir = str(tmp_path_factory.mktemp("uninterrupted"))
  out = _run(model_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  return model_dir, out.stderr


@pytest.mark.slow
def test_tiny_run_lowers_loss_and_logs(uninterrupted):
  model_dir, log = uninterrupted
  metrics = _metrics(model_dir)
  assert [m["step"] for m in metrics] == list(range(1, STEPS + 1))
  first = metrics[0]["cross_ent_loss_per_target_token"]
  last = np.mean([m["cross_ent_loss_per_target_token"] for m in metrics[-5:]])
  assert first > np.log(256) - 1.0  # near uniform over bytes at the start
  assert last < first - 2.0, (first, last)
  assert f"step {STEPS}/{STEPS}" in log and "tokens/s" in log and "ETA" in log
  assert os.path.isfile(os.path.join(model_dir, "config.gin"))
  assert "TASK_FEATURE_LENGTHS" in open(os.path.join(model_dir, "config.gin")).read()
  assert os.listdir(os.path.join(model_dir, "train"))  # TensorBoard event file
  # Saved every `period` steps, at `steps` and at the end; not at the first step.
  saved = sorted(int(n[11:]) for n in os.listdir(model_dir) if n.startswith("checkpoint_"))
  assert saved == sorted(list(range(4, STEPS + 1, 4)) + [6, 39])


@pytest.mark.slow
def test_sigkill_then_resume_gives_identical_params(uninterrupted, tmp_path):
  model_dir = str(tmp_path / "killed")
  args, env = _cli(model_dir)
  proc = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  committed = lambda: [n for n in (os.listdir(model_dir) if os.path.isdir(model_dir) else [])
                       if n.startswith("checkpoint_") and n[11:].isdigit()]
  deadline = time.time() + 300
  while not [n for n in committed() if int(n[11:]) >= 8] and time.time() < deadline:
    assert proc.poll() is None, "the run ended before it could be killed"
    time.sleep(0.02)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  killed_at = max(int(n[11:]) for n in committed())
  assert 8 <= killed_at < STEPS
  out = _run(model_dir)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resumed from" in out.stderr
  resumed = _params(model_dir, STEPS)
  reference = _params(uninterrupted[0], STEPS)
  flat_a = jax.tree_util.tree_leaves_with_path(resumed)
  flat_b = dict(jax.tree_util.tree_leaves_with_path(reference))
  assert len(flat_a) == len(flat_b) > 20
  for path, value in flat_a:
    np.testing.assert_array_equal(value, flat_b[path], err_msg=jax.tree_util.keystr(path))


def _parse(files, bindings):
  gin.clear_config()
  gin_utils.parse_gin(files, bindings)


@pytest.mark.slow
def test_uptrain_restores_converted_checkpoint_with_fresh_optimizer(tmp_path):
  original_steps, alpha = 40, 0.05
  config = t5_1_1_config("tiny", dtype="float32", vocab_size=training_task.VOCAB_SIZE,
                         num_kv_heads=1, num_encoder_layers=1, num_decoder_layers=1)
  model = EncoderDecoderModel(config)
  shapes = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}
  converted = jax.tree.map(np.asarray, jax.device_get(
      trainer.nn.meta.unbox(model.init(jax.random.key(7), shapes))))
  orbax_format.save(str(tmp_path / "converted"), original_steps, converted, config)
  total = int(original_steps * (1 + alpha))
  _parse(["models/t5_1_1/tiny.gin", "attention/mqa.gin", "runs/uptrain.gin"],
         BINDINGS + [f"MODEL_DIR = '{tmp_path / 'run'}'", f"TRAIN_STEPS = {total}",
                     f"INITIAL_CHECKPOINT_PATH = '{tmp_path / 'converted' / 'checkpoint_40'}'"])
  from gqa_flax import train
  summary = train.train()
  assert summary["start_step"] == original_steps and summary["step"] == total
  metrics = _metrics(str(tmp_path / "run"))
  assert [m["step"] for m in metrics] == [41, 42]  # alpha * N = 2 steps
  assert metrics[0]["learning_rate"] == pytest.approx(1 / np.sqrt(40))  # schedule continues
  saved = _params(str(tmp_path / "run"), total)
  assert int(saved["state"]["step"]) == total
  assert int(saved["state"]["param_states"][0]["count"]) == 2  # Adafactor started fresh

  # Independent: the converted params, a fresh Adafactor and the same two batches.
  optimizer = adafactor.adafactor()
  lr = schedules.create_learning_rate_scheduler("constant * rsqrt_decay", 1.0, 10)
  state = trainer.TrainState(step=jax.numpy.int32(original_steps), params=converted,
                             param_states=optimizer.init(converted))
  step = jax.jit(trainer.make_train_step(model, optimizer, lr))
  cfg = data_pipeline.DatasetConfig(training_task.TASK_NAME, LENGTHS, batch_size=8, seed=0)
  batches = data_pipeline.as_numpy(data_pipeline.get_dataset(cfg, Partitioner().data_layout(8)))
  for _ in range(total - original_steps):
    state, _ = step(state, next(batches))
  for path, value in jax.tree_util.tree_leaves_with_path(state.params):
    expected = saved["target"]
    for key in path:
      expected = expected[key.key]
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=1e-7)
  gin.clear_config()


@pytest.mark.parametrize("files,bindings,error,message", [
    (["runs/pretrain.gin"], ["TRAIN_STEP = 10"], ValueError, "unknown macro TRAIN_STEP"),
    ([], [], ValueError, "MODEL_DIR is not set"),
    (["attention/mqa.gin"], ["MODEL_DIR = '{tmp}/m'", "t5_1_1_config.num_kv_heads = 3"],
     ValueError, "num_kv_heads=3 must be a positive divisor of num_heads=4"),
    (["runs/uptrain.gin"], ["MODEL_DIR = '{tmp}/m'", "INITIAL_CHECKPOINT_PATH = '{tmp}/none'"],
     FileNotFoundError, "is not a checkpoint_<step> directory"),
    ([], ["MODEL_DIR = '{tmp}/m'", "MIXTURE_OR_TASK_NAME = 'no_such_task'"],
     ValueError, "unknown seqio task or mixture 'no_such_task'"),
])
def test_bad_configuration_fails_before_compute(tmp_path, files, bindings, error, message):
  bindings = BINDINGS + ["TRAIN_STEPS = 2"] + [b.format(tmp=tmp_path) for b in bindings]
  with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
    _parse(["models/t5_1_1/tiny.gin", "runs/pretrain.gin"] + files, bindings)
    from gqa_flax import train
    train.train()
  gin.clear_config()
  assert not os.path.exists(tmp_path / "m" / "checkpoint_0")
  assert not os.path.exists(tmp_path / "m" / "metrics.jsonl")


def test_cli_bad_configuration_exits_nonzero_with_one_line(tmp_path):
  out = _run("", steps=2)
  assert out.returncode != 0
  assert "MODEL_DIR is not set; pass --gin.MODEL_DIR" in out.stderr
