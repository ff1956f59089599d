"""`gqa-reproduce --preset paper` on the simulated pod (tests/pod.py), its models shrunk to the
real tiny T5X legacy checkpoint and its tasks to the offline mini title task: the sources are
read from gs:// URLs on the local GCS server (tests/gcs_server.py), every stage runs on both
hosts, and table1.json's scores equal those of the same run in one process with 8 devices,
although one host was killed in the middle and the pod's run resumed."""
import json
import os
import signal
import time

import pytest
from etils import epath

from gqa_flax.checkpoints import load_checkpoint, t5x_legacy
from gqa_flax.checkpoints.arrays import flatten
from tests import pod
from tests.test_convert import T5X_TINY

pytestmark = pytest.mark.pod  # several processes; also slow
TIMEOUT = 600


def _bindings(large: str, xxl: str):
  return [
      "Preset.models = {'Large': 'models/t5_1_1/tiny.gin', 'XXL': 'models/t5_1_1/tiny.gin'}",
      f"Preset.checkpoints = {{'Large': '{large}', 'XXL': '{xxl}'}}",
      "Preset.pretrain_steps = 0", "Preset.finetune_steps = 3",
      "Preset.tasks = {'gqa_mini_title': 'reproduce/smoke/title.gin'}",
      "Preset.bindings = ['BATCH_SIZE = 8', 'NUM_PARTITIONS = 2', 'train.stats_period = 1']",
      "Preset.variants = [('Large', None, 0.0, 'mean'), ('XXL', 1, 0.0, 'mean')]",
      "Preset.table_variants = [('Large', None, 0.0, 'mean'), ('XXL', 1, 0.0, 'mean')]",
      "Preset.eval_examples = 12", "Preset.eval_batch_size = 8", "Preset.timing_repeats = 1",
      "Preset.decode_partitions = 4",
      "Preset.heldout_task_gin = 'reproduce/mini/span_corruption.gin'",
      "Preset.heldout_examples = 16", "Preset.heldout_batch_size = 8",
      "Preset.fig6 = {'model': 'XXL', 'groups': [1, 2, 4], 'inputs': 16, 'targets': 4, "
      "'batch': 8}",
      "Preset.fig6_layouts = {1: (4, True, 8)}"]  # MQA: batch-partitioned attention


def _wait_for(path, job: pod.Pod) -> None:
  deadline = time.time() + TIMEOUT
  while not path.exists():
    if time.time() > deadline or any(p.poll() is not None for p in job.processes):
      job.kill()
      raise AssertionError(f"{path} did not appear:\n{job.outputs()[0][-3000:]}")
    time.sleep(0.5)


def _argv(out, bindings):
  return pod.module("gqa_flax.reproduce.cli", "--preset", "paper", "--out", str(out),
                    "--heartbeat", "60", *(f"--gin_bindings={b}" for b in bindings))


def test_paper_preset_on_the_pod_from_gs_resumes_after_a_lost_host_and_equals_one_process(
    tmp_path, mini_data_dir, gcs_server):
  root = f"gs://{gcs_server.bucket}/pretrained"
  large = f"{root}/t5_1_1_large/checkpoint_0"  # the fixture's msgpack file, arrays inline
  epath.Path(large).mkdir(parents=True)
  epath.Path(T5X_TINY).copy(f"{large}/{t5x_legacy.CHECKPOINT_FILE}")
  xxl = f"{root}/t5_1_1_xxl/checkpoint_0"  # the same arrays in TensorStore zarr on gs://
  fixture = load_checkpoint(T5X_TINY)
  t5x_legacy.write_t5x_legacy(xxl, flatten(fixture.params), 0, inline_max_bytes=1024)
  env = {"GQA_DATA_DIR": str(mini_data_dir)}
  bindings = _bindings(large, xxl)
  # Host 1 is killed (with its stage's process) once the first fine-tuning stage starts: host
  # 0 ends by itself within a minute with one line; rerun on both hosts, the pod resumes.
  # Fresh interpreters (forked=False), each in its own process group: killing host 1 ends its
  # stage and its fork server too.
  killed = pod.Pod(_argv(tmp_path / "pod", bindings), env=env, forked=False)
  _wait_for(tmp_path / "pod" / "stages" / "heldout" / "DONE.json", killed)
  time.sleep(5)
  os.killpg(killed.processes[1].pid, signal.SIGKILL)
  assert killed.exit_times(90)[0] < 60, killed.outputs()[0][-3000:]
  last = killed.outputs()[0].strip().splitlines()[-1]
  assert last.startswith("gqa-reproduce: error: a process stopped responding") and \
      last.endswith("(process 1 of 2)"), killed.outputs()[0][-3000:]
  assert not (tmp_path / "pod" / "table1.json").exists()
  job = pod.Pod(_argv(tmp_path / "pod", bindings), env=env, forked=False)
  single = pod.run_single(_argv(tmp_path / "single", bindings), TIMEOUT, env=env, forked=False)
  outputs = job.wait(TIMEOUT)
  assert "wrote" in outputs[0].output and "table1.md" in outputs[0].output
  assert "to run" in outputs[0].output and " 0 done" not in outputs[0].output  # resumed
  tables = [json.loads((tmp_path / out / "table1.json").read_text()) for out in ("pod", "single")]
  rows = [{r["label"]: (r["scores"], r["n_eval_examples"], r["kv_heads"]) for r in t["rows"]}
          for t in tables]
  assert rows[0] == rows[1], (rows, single.output[-2000:])
  assert set(rows[0]) == {"MHA-Large", "MQA-XXL"}
  for scores, counts, _ in rows[0].values():
    assert set(scores) == {"gqa_mini_title"} and 0 < counts["gqa_mini_title"] <= 12, rows
  assert [p["kv_heads"] for p in tables[0]["fig6"]["points"]] == [1, 2, 4]
  assert [p["layout"] for p in tables[0]["fig6"]["points"]] == [
      {"num_partitions": 4, "kv_batch_partitioned": kv_split, "batch_size": 8}
      for kv_split in (True, False, False)]
  # The held-out loss stage, sharded over the pod: the same losses as in one process.
  losses = [{e["key"]: e["loss"] for e in t["heldout"]} for t in tables]
  assert set(losses[0]) == {"large-mha", "xxl-mqa-a0-mean"}
  assert losses[0] == pytest.approx(losses[1], rel=1e-5)
  test_losses = [{r["label"]: r["test_loss"]["gqa_mini_title"]["loss"] for r in t["rows"]}
                 for t in tables]  # the fine-tuned models' per-example test loss, likewise
  assert test_losses[0] == pytest.approx(test_losses[1], rel=1e-5)
  # Every stage ran and left its log and marker once, under OUT.
  stages = sorted(p.name for p in (tmp_path / "pod" / "stages").iterdir())
  assert stages == sorted(p.name for p in (tmp_path / "single" / "stages").iterdir())
  for stage in stages:
    names = {p.name for p in (tmp_path / "pod" / "stages" / stage).iterdir()}
    assert {"DONE.json", "log.txt"} <= names and not any("process" in n for n in names), stage
