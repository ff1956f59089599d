"""The paper's jobs on a simulated pod (tests/pod.py: 2 processes x 4 CPU devices, jax.distributed
on 127.0.0.1, gloo collectives), each checked against the same command in one process with 8
devices: training (per-step losses, final params, the global batches, metrics written once,
kill -9 and resume), partitioned decoding, conversion and evaluation."""
import json
import os
import time

import flax.linen as nn
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import seqio

from gqa_flax import checkpoints
from gqa_flax.convert import main as convert_main
from gqa_flax.models import t5_1_1_config
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from tests import pod, training_task
from test_checkpoints import hf_dir  # noqa: F401  (pytest fixture)
from tests.test_convert import T5X_TINY
from tests.test_training import BINDINGS, LENGTHS

BATCH_SIZE = 8  # BINDINGS' BATCH_SIZE
STEPS = 6
# Fine-tuning's constant rate (x10): with pre-training's 0.3 at step 10 the reduction order of
# gloo's all-reduce vs one process's (last bits) grows to 1e-4 in the params in six steps.
LEARNING_RATE = ["create_learning_rate_scheduler.factors = 'constant'",
                 "create_learning_rate_scheduler.base_learning_rate = 0.01"]
pytestmark = pytest.mark.pod  # several processes; also slow
TIMEOUT = 300


def _train_argv(model_dir, num_partitions, steps=STEPS, extra=()):
  return pod.module(
      "gqa_flax.train", "--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/pretrain.gin",
      f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TRAIN_STEPS={steps}",
      f"--gin.NUM_PARTITIONS={num_partitions}",
      *(f"--gin_bindings={b}" for b in BINDINGS + LEARNING_RATE + list(extra)))


def _metrics(model_dir):
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(model_dir):
  return {row["step"]: row for row in _metrics(model_dir) if "loss" in row}


def _params(model_dir, step):
  return checkpoints.load(os.path.join(model_dir, f"checkpoint_{step}"))[1]


def _assert_same_params(a, b):
  flat_a, flat_b = (dict(ocp.tree.to_flat_dict(p)) for p in (a, b))
  assert flat_a.keys() == flat_b.keys()
  for name in flat_a:
    np.testing.assert_allclose(flat_a[name], flat_b[name], rtol=1e-5, atol=1e-6, err_msg=str(name))


def _expected_target_tokens(data_shards, steps):
  """Target tokens of each step's global batch, read independently of the trainer: shard r's
  BATCH_SIZE / data_shards examples from shard r of data_shards, shards concatenated."""
  per_shard = BATCH_SIZE // data_shards
  shards = []
  for r in range(data_shards):
    ds = seqio.get_dataset(
        training_task.TASK_NAME, LENGTHS, dataset_split="train", shuffle=True, seed=0, num_epochs=None,
        feature_converter=seqio.EncDecFeatureConverter(pack=True),
        shard_info=seqio.ShardInfo(r, data_shards)).batch(per_shard, drop_remainder=True)
    shards.append([batch["decoder_loss_weights"].sum()
                   for batch in ds.take(steps).as_numpy_iterator()])
  return [float(sum(shard[step] for shard in shards)) for step in range(steps)]


@pytest.fixture(scope="module")
def trained_tiny(tmp_path_factory):
  """MODEL_DIR of a 2-step gqa-train run (one process) of the tiny MHA model: our Orbax
  checkpoints with optimizer state, as the reproduction pre-trains them."""
  model_dir = tmp_path_factory.mktemp("trained") / "model"
  pod.run_single(_train_argv(model_dir, 1, steps=2, extra=["SaveCheckpointConfig.period = 2"]),
                 TIMEOUT, devices=1)
  return model_dir


@pytest.mark.parametrize("num_partitions,num_data_shards,single_devices",
                         [(2, None, 8), (8, None, 8), (2, 1, 1)])
def test_pod_training_equals_one_process(tmp_path, num_partitions, num_data_shards,
                                         single_devices):
  """NUM_PARTITIONS 2 (4 data rows, 2 per host) and 8 (the model axis spans both hosts, which
  read the same data): the same losses, batches and params as one process with 8 devices;
  with one data shard (the reproduction's setting), as one process with one device."""
  single, pod_dir = tmp_path / "single", tmp_path / "pod"
  shards = [] if num_data_shards is None else [f"Partitioner.num_data_shards = {num_data_shards}"]
  job = pod.Pod(_train_argv(pod_dir, num_partitions, extra=shards))
  pod.run_single(_train_argv(single, num_partitions if single_devices == 8 else 1, extra=shards),
                 TIMEOUT, devices=single_devices)
  job.wait(TIMEOUT)

  pod_losses, single_losses = _losses(pod_dir), _losses(single)
  assert [row["step"] for row in _metrics(pod_dir) if "loss" in row] == list(range(1, STEPS + 1))
  expected_tokens = _expected_target_tokens(num_data_shards or 8 // num_partitions, STEPS)
  for step in range(1, STEPS + 1):
    np.testing.assert_allclose(pod_losses[step]["loss"], single_losses[step]["loss"], rtol=1e-5)
    assert pod_losses[step]["num_target_tokens"] == expected_tokens[step - 1]
    assert single_losses[step]["num_target_tokens"] == expected_tokens[step - 1]
  _assert_same_params(_params(pod_dir, STEPS), _params(single, STEPS))


def test_pod_training_resumes_after_kill(tmp_path):
  """Both processes SIGKILLed after a checkpoint; the same command resumes to the params of
  one uninterrupted process."""
  steps, extra = 12, ["SaveCheckpointConfig.period = 4"]
  killed, single = tmp_path / "killed", tmp_path / "single"
  job = pod.Pod(_train_argv(killed, 2, steps, extra))
  deadline = time.time() + TIMEOUT
  while not (killed / "checkpoint_4").is_dir() or (killed / "checkpoint_8").exists():
    assert time.time() < deadline and all(p.poll() is None for p in job.processes), \
        "no checkpoint_4 before the end: " + job.outputs()[0][-2000:]
    time.sleep(0.2)
  job.kill()
  reference = pod.Pod(_train_argv(single, 2, steps, extra), num_processes=1,
                      devices_per_process=8)
  pod.run_pod(_train_argv(killed, 2, steps, extra), TIMEOUT)
  reference.wait(TIMEOUT)
  _assert_same_params(_params(killed, steps), _params(single, steps))
  resumed = _losses(killed)
  for step in range(9, steps + 1):
    np.testing.assert_allclose(resumed[step]["loss"], _losses(single)[step]["loss"], rtol=1e-5)


def _decode_results(output, kind="RESULT"):
  return [json.loads(line[len(kind) + 1:]) for line in output.splitlines()
          if line.startswith(kind + " ")]


def test_partitioned_decoding_equals_single_device():
  """Greedy and beam tokens of the partitioned Predictor equal single-device decoding for MHA,
  GQA-2 and MQA at NUM_PARTITIONS 4 and 8, with K/V replicated or (Pope et al.) the batch
  split over every device for attention, on the pod and in one process with 8 devices;
  sharded params and caches are not held whole by any device. A batch of 3 on a data axis of
  8 (the reproduction's timing batch on an 8-device host once failed) decodes its own rows."""
  argv = pod.module("tests.pod_decode_check")
  job = pod.Pod(argv)
  single_output = pod.run_single(argv, TIMEOUT).output
  pod_output = job.wait(TIMEOUT)[0].output
  for output in (single_output, pod_output):
    assert _decode_results(output, "UNEVEN") == [{
        "kv_heads": 2, "rows": 3, "data_parallel_size": 8, "shape": [3, 8], "greedy_equal": True}]
  single, on_pod = _decode_results(single_output), _decode_results(pod_output)
  for results, processes in ((single, 1), (on_pod, 2)):
    assert [(r["num_partitions"], r["kv_heads"]) for r in results] == [
        (4, 8), (4, 2), (4, 1), (8, 8), (8, 2), (8, 1)]
    for r in results:
      assert r["processes"] == processes and r["devices"] == 8
      assert r["greedy_equal"] and r["beam_equal"] and r["same_on_every_process"], r
      assert r["nonzero_tokens"] > 0 and not r["query_kernel_fully_held"], r
    by_case = {(r["num_partitions"], r["kv_heads"]): r for r in results}
    assert by_case[(4, 2)]["beam_differs_from_greedy"]  # the beam test can tell beams apart
    # MHA's caches: kv_heads over 'model' (and the batch over 'data' on the 2x4 mesh).
    assert by_case[(4, 8)]["self_cache_spec"] == ["data", "model"]
    assert by_case[(8, 8)]["self_cache_spec"] == ["None", "model"]
    for case in ((4, 8), (8, 8), (4, 2), (4, 1)):
      assert not by_case[case]["self_cache_fully_held"], case
      assert not by_case[case]["cross_cache_fully_held"], case
    # Fewer K/V heads than the model axis: the K/V (kernels, caches) replicated over 'model'.
    assert by_case[(8, 1)]["key_kernel_fully_held"] and by_case[(8, 1)]["self_cache_fully_held"]
  # Batch-partitioned attention (kv_batch_partitioned): the same tokens as the replicated K/V
  # (both equal single-device decoding), each device holding the caches of its own row only.
  for output, processes in ((single_output, 1), (pod_output, 2)):
    split = _decode_results(output, "SPLIT")
    assert [(r["num_partitions"], r["kv_heads"]) for r in split] == [(4, 1), (8, 1), (8, 2)]
    for r in split:
      assert r["processes"] == processes and r["greedy_equal"] and r["beam_equal"], r
      assert r["same_on_every_process"] and r["nonzero_tokens"] > 0, r
      assert r["self_cache_rows_per_device"] == r["cross_cache_rows_per_device"] == 1, r


def _t5x_orbax_checkpoint(model_dir) -> str:
  """The real T5X fixture's params in T5X's Orbax layout (the `state` item only), step 5."""
  _, params = checkpoints.load(T5X_TINY)
  with ocp.CheckpointManager(str(model_dir), options=ocp.CheckpointManagerOptions(
      step_prefix="checkpoint")) as manager:
    manager.save(5, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
        {"target": params, "state": {"step": np.int64(5)}})))
  return str(model_dir / "checkpoint_5")


def _assert_same_checkpoints(a, b):
  config_a, params_a = checkpoints.load(str(a))
  config_b, params_b = checkpoints.load(str(b))
  assert config_a == config_b
  flat_a, flat_b = (dict(ocp.tree.to_flat_dict(p)) for p in (params_a, params_b))
  assert flat_a.keys() == flat_b.keys()
  for name, value in flat_a.items():
    np.testing.assert_array_equal(value, flat_b[name], err_msg=str(name))
  return config_a


@pytest.mark.parametrize("source", ["t5x_legacy", "ours_orbax", "t5x_orbax", "hf"])
def test_pod_conversion_writes_dst_once_equal_to_one_process(tmp_path, source, request):
  """gqa-convert on every host: one DST (no temporary siblings left), equal array for array to
  a single-process conversion, for every source format: the real T5X legacy fixture, our Orbax
  checkpoint as gqa-train writes it, T5X's Orbax layout and a HF directory (the Orbax ones
  once deadlocked: their reads waited for hosts that do not convert)."""
  if source == "t5x_legacy":
    src = T5X_TINY
  elif source == "ours_orbax":
    src = request.getfixturevalue("trained_tiny") / "checkpoint_2"
  elif source == "t5x_orbax":
    src = _t5x_orbax_checkpoint(tmp_path / "t5x_orbax")
  else:
    src = request.getfixturevalue("hf_dir")[0]
  out = tmp_path / "out"
  out.mkdir()
  argv = lambda dst: pod.module("gqa_flax.convert", f"--src={src}", f"--dst={dst}",
                                "--num_kv_heads=2")
  results = pod.run_pod(argv(out / "pod"), TIMEOUT)
  assert convert_main([f"--src={src}", f"--dst={out / 'single'}", "--num_kv_heads=2"]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["pod", "single"]
  assert all("wrote GQA-2 checkpoint" in r.output for r in results)
  assert _assert_same_checkpoints(out / "pod", out / "single").num_kv_heads == 2


def test_pod_calibrated_aligned_conversion_equals_one_process(tmp_path, mini_data_dir):
  """--method aligned calibrated on a task's examples: process 0 runs the model alone (its
  layers streamed from the checkpoint) while the other host waits; DST equals one process's."""
  config = t5_1_1_config("tiny", vocab_size=768, num_decoder_layers=2, dtype="float32")
  boxed = EncoderDecoderModel(config).init(jax.random.key(5), {
      "encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)})
  checkpoints.save(str(tmp_path / "mha"), 7, nn.meta.unbox(boxed), config)
  calibration = ["--method=aligned", "--calibration_task_gin=reproduce/mini/span_corruption.gin",
                 "--calibration_split=validation", "--calibration_examples=8",
                 "--calibration_batch_size=4"]
  argv = lambda dst: pod.module("gqa_flax.convert", f"--src={tmp_path / 'mha'}", f"--dst={dst}",
                                "--num_kv_heads=2", *calibration)
  env = {"GQA_DATA_DIR": str(mini_data_dir)}
  results = pod.run_pod(argv(tmp_path / "pod"), TIMEOUT, env=env)
  assert all("wrote GQA-2 checkpoint" in r.output for r in results)
  pod.run_single(argv(tmp_path / "single"), TIMEOUT, devices=1, env=env)
  assert _assert_same_checkpoints(tmp_path / "pod", tmp_path / "single").num_kv_heads == 2
  metadata = checkpoints.load_checkpoint(str(tmp_path / "pod")).metadata
  assert metadata["method"] == "aligned" and metadata["calibration"]["examples"] == 8


def test_pod_eval_decodes_each_example_once_and_writes_one_metrics_file(tmp_path):
  """gqa-eval on the pod (mesh 4 x 2 over both hosts, 13 examples: the last batch of 8 is
  padded): one predictions file with each example once, and metrics.json equal to one
  process's."""
  config = t5_1_1_config("tiny", vocab_size=training_task.VOCAB_SIZE, num_encoder_layers=1,
                         num_decoder_layers=1, dtype="float32")
  boxed = EncoderDecoderModel(config).init(jax.random.key(3), {
      "encoder_input_tokens": (1, 8), "decoder_input_tokens": (1, 8)})
  params = jax.tree.map(lambda x: np.asarray(x) * 4.0, nn.meta.unbox(boxed))
  checkpoints.save(str(tmp_path / "ckpt"), 7, params, config)

  def argv(out):
    return pod.module(
        "gqa_flax.eval", "--gin_file=runs/eval.gin", f"--gin.CHECKPOINT_PATH='{tmp_path}/ckpt'",
        f"--gin.EVAL_OUTPUT_DIR='{out}'", f"--gin.MIXTURE_OR_TASK_NAME='{training_task.TASK_NAME}'",
        "--gin.MIXTURE_OR_TASK_MODULE='tests.training_task'",
        "--gin.TASK_FEATURE_LENGTHS={'inputs': 32, 'targets': 16}", "--gin.EVAL_SPLIT='validation'",
        "--gin.EVAL_MAX_EXAMPLES=13", "--gin.BATCH_SIZE=8", "--gin.NUM_PARTITIONS=2")
  job = pod.Pod(argv(tmp_path / "pod"))
  pod.run_single(argv(tmp_path / "single"), TIMEOUT)
  job.wait(TIMEOUT)
  read = lambda out, name: (tmp_path / out / name).read_text()
  pod_metrics, single_metrics = (json.loads(read(out, "metrics.json")) for out in ("pod", "single"))
  assert pod_metrics["num_examples"] == {training_task.TASK_NAME: 13}
  assert pod_metrics["metrics"] == single_metrics["metrics"]
  predictions = f"{training_task.TASK_NAME}-predictions.jsonl"
  rows = [json.loads(line) for line in read("pod", predictions).splitlines()]
  assert read("pod", predictions) == read("single", predictions)
  assert len(rows) == 13 and len({row["inputs"] for row in rows}) == 13
  assert any(row["prediction"] for row in rows)


@pytest.mark.parametrize("failing", [0, 1])
def test_a_user_error_on_one_process_ends_every_process_with_its_line(tmp_path, failing):
  """One host's INITIAL_CHECKPOINT_PATH does not exist: it fails before the barrier the other
  waits at (an hour's timeout), and both end within seconds with the same line."""
  job = pod.Pod(_train_argv(tmp_path / "run", 1), process_args={
      failing: [f"--gin.INITIAL_CHECKPOINT_PATH='{tmp_path}/nowhere'"]})
  exit_times = job.exit_times(TIMEOUT)
  outputs = job.outputs()
  assert max(exit_times) - min(exit_times) < 20, (exit_times, [o[-2000:] for o in outputs])
  assert [p.returncode for p in job.processes] == [1, 1], [o[-2000:] for o in outputs]
  lines = [[line for line in output.splitlines() if line.startswith("gqa-train: error:")]
           for output in outputs]
  assert lines[0] == lines[1] and len(lines[0]) == 1, lines
  assert f"restore path {tmp_path}/nowhere is not" in lines[0][0]
  assert lines[0][0].endswith(f"(process {failing} of 2)")
  assert not any("Traceback" in output for output in outputs)
