"""Checkpoints on gs:// against a local GCS server (tests/gcs_server.py): every client reaches
it, conversion SRC and DST, Orbax checkpoints and the trainer's CheckpointManager."""
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorstore as ts
from etils import epath

from gqa_flax import checkpoints
from gqa_flax.checkpoints import t5x_legacy
from gqa_flax.checkpoints.arrays import flatten
from gqa_flax.checkpoints.convert import convert_checkpoint
from gqa_flax.convert import main as gqa_convert
from gqa_flax.models import t5_1_1_config
from gqa_flax.training import checkpointing
from gqa_flax.training.trainer import TrainState
from test_checkpoints import hf_dir  # noqa: F401  (pytest fixture)

T5X_TINY = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "t5x" / \
    "test_t5_tiny.checkpoint_0"
TINY = t5_1_1_config("tiny", vocab_size=64)


def test_every_client_reaches_the_local_server(gcs_server):
  """tf.io.gfile (etils.epath's gs:// backend), TensorStore and google-cloud-storage share one
  bucket: what one writes, the others read."""
  from google.cloud import storage  # pylint: disable=import-outside-toplevel
  root = f"gs://{gcs_server.bucket}/clients"
  with tf.io.gfile.GFile(f"{root}/by_tf.txt", "w") as f:
    f.write("written by tf.io.gfile")
  array = np.arange(12, dtype=np.float32).reshape(4, 3)
  store = ts.open({"driver": "zarr", "kvstore": f"{root}/by_tensorstore/",
                   "metadata": {"shape": [4, 3], "chunks": [2, 3], "dtype": "<f4"}},
                  create=True).result()
  store.write(array).result()
  assert epath.Path(f"{root}/by_tf.txt").read_text() == "written by tf.io.gfile"
  assert sorted(p.name for p in epath.Path(root).iterdir()) == ["by_tensorstore", "by_tf.txt"]
  assert epath.Path(f"{root}/by_tensorstore").is_dir()
  assert tf.io.gfile.exists(f"{root}/by_tensorstore/.zarray")
  epath.Path(f"{root}/by_tf.txt").rename(f"{root}/renamed.txt")
  reread = ts.open({"driver": "zarr", "kvstore": {"driver": "gcs", "bucket": gcs_server.bucket,
                                                  "path": "clients/by_tensorstore/"}}).result()
  np.testing.assert_array_equal(reread[1:3].read().result(), array[1:3])
  names = {blob.name for blob in storage.Client().list_blobs(gcs_server.bucket, prefix="clients/")}
  assert names == {"clients/renamed.txt", "clients/by_tensorstore/.zarray",
                   "clients/by_tensorstore/0.0", "clients/by_tensorstore/1.0"}


def _upload(local: Path, url: str) -> str:
  """Copies the file or directory tree `local` to `url` (as a user's gsutil cp -r would)."""
  files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
  for path in files:
    target = epath.Path(url) if path == local else epath.Path(url, path.relative_to(local))
    target.write_bytes(path.read_bytes())
  return url


def _assert_same_params(got, expected):
  got, expected = flatten(got), flatten(expected)
  assert got.keys() == expected.keys()
  for name, value in expected.items():
    assert got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


@pytest.fixture(scope="module")
def legacy_on_gcs(gcs_server, tmp_path_factory):
  """The real T5X fixture (a msgpack file) and a T5X legacy dir with zarr arrays, uploaded."""
  local = tmp_path_factory.mktemp("legacy") / "checkpoint_0"
  t5x_legacy.write_t5x_legacy(str(local), flatten(checkpoints.load(T5X_TINY)[1]), 0,
                              inline_max_bytes=1000)
  root = f"gs://{gcs_server.bucket}/legacy"
  return {str(T5X_TINY): _upload(T5X_TINY, f"{root}/test_t5_tiny.checkpoint_0"),
          str(local): _upload(local, f"{root}/run/checkpoint_0")}


@pytest.mark.slow
def test_gcs_legacy_checkpoints_convert_to_gcs_like_local_ones(legacy_on_gcs, tmp_path):
  """gs:// SRC (msgpack file; zarr arrays read through the gcs kvstore) -> gs:// DST equals
  the local conversion; the DST step is committed (commit_success.txt), nothing left beside."""
  for i, (local, url) in enumerate(legacy_on_gcs.items()):
    dst = f"{url.rsplit('/', 2)[0]}/converted_{i}"
    assert gqa_convert(["--src", url, "--dst", dst, "--num_kv_heads", "2"]) == 0
    convert_checkpoint(local, str(tmp_path / f"local_{i}"), 2, progress=False)
    expected = checkpoints.load_checkpoint(str(tmp_path / f"local_{i}"))
    converted = checkpoints.load_checkpoint(dst)
    assert converted.config == expected.config and converted.step == expected.step == 0
    assert converted.metadata == dict(expected.metadata, source_path=url)
    _assert_same_params(converted.params, expected.params)
    assert tf.io.gfile.exists(f"{dst}/checkpoint_0/commit_success.txt")
    assert tf.io.gfile.listdir(f"{dst}") == ["checkpoint_0/"]
  with pytest.raises(FileExistsError, match="pass --overwrite"):
    convert_checkpoint(url, dst, 1, progress=False)
  convert_checkpoint(url, dst, 1, overwrite=True, progress=False)
  assert checkpoints.open_checkpoint(dst).config.num_kv_heads == 1


def test_gcs_root_means_latest_committed_step(legacy_on_gcs, tmp_path):
  """An Orbax step on gs:// without its commit_success.txt (an interrupted write) is skipped."""
  config, params = checkpoints.load(T5X_TINY)
  root = f"gs://{next(iter(legacy_on_gcs.values())).split('/')[2]}/model_dir"
  for step in (1, 2):
    checkpoints.save(root, step, jax.tree.map(lambda x, s=step: x * s, params), config)
  assert checkpoints.resolve(root) == f"{root}/checkpoint_2"
  epath.Path(f"{root}/checkpoint_2/commit_success.txt").unlink()
  assert checkpoints.resolve(f"{root}/checkpoint_2") is None
  loaded = checkpoints.load_checkpoint(root)
  assert loaded.step == 1
  _assert_same_params(loaded.params, params)


def test_gcs_hf_and_legacy_load_like_local_ones(legacy_on_gcs, hf_dir):  # noqa: F811
  """HF safetensors read by byte ranges over tf.io.gfile; load_sharded from gs:// too."""
  hf_path, _ = hf_dir
  url = _upload(Path(hf_path), f"gs://{next(iter(legacy_on_gcs.values())).split('/')[2]}/hf")
  config, params = checkpoints.load(url)
  assert (config, flatten(params).keys()) == (checkpoints.load(hf_path)[0],
                                             flatten(checkpoints.load(hf_path)[1]).keys())
  _assert_same_params(params, checkpoints.load(hf_path)[1])
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  for local, url in [(hf_path, url), *legacy_on_gcs.items()]:
    loaded = checkpoints.load_sharded(url, lambda c: jax.tree.map(lambda _: device,
                                                                  checkpoints.load(local)[1]))
    _assert_same_params(jax.device_get(loaded.params), checkpoints.load(local)[1])


def test_trainer_checkpointer_saves_restores_and_rotates_on_gcs(gcs_server):
  """The trainer's Checkpointer (Orbax CheckpointManager, async) at a gs:// MODEL_DIR: keep=1
  deletes the older step (through google-cloud-storage), the latest restores exactly, and
  training's restore path reads it as INITIAL_CHECKPOINT_PATH."""
  model_dir = f"gs://{gcs_server.bucket}/train_run"
  checkpointer = checkpointing.Checkpointer(model_dir, checkpointing.SaveCheckpointConfig(
      period=1, keep=1))
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3, jnp.bfloat16)}
  states = [TrainState(step=jnp.asarray(step, jnp.int32),
                       params=jax.tree.map(lambda x, s=step: x * s, params),
                       param_states={"count": jnp.asarray(step)}) for step in (1, 2)]
  for batches, state in enumerate(states, 1):
    assert checkpointer.save(state, TINY, batches)
  checkpointer.wait_until_finished()
  assert checkpointer.manager.all_steps() == [2]
  assert tf.io.gfile.listdir(model_dir) == ["checkpoint_2/"]
  checkpointer.close()
  reopened = checkpointing.Checkpointer(model_dir, checkpointing.SaveCheckpointConfig())
  assert reopened.latest_step() == 2
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                         sharding=x.sharding), states[1])
  restored, batches = reopened.restore_latest(abstract)
  reopened.close()
  assert batches == 2 and int(restored.step) == 2
  _assert_same_params(jax.device_get(restored.params), jax.device_get(states[1].params))
  assert int(restored.param_states["count"]) == 2
  restore = checkpointing.RestoreCheckpointConfig(path=model_dir, mode="latest")
  assert restore.checkpoint_dir() == f"{model_dir}/checkpoint_2"


@pytest.mark.slow
def test_training_writes_model_dir_on_gs(gcs_server):
  """gqa-train with MODEL_DIR on gs://: config.gin, metrics.jsonl (each step once) and the
  Orbax checkpoints land in the bucket."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  from tests.test_training import ROOT, _cli  # pylint: disable=import-outside-toplevel
  model_dir = f"gs://{gcs_server.bucket}/runs/train"
  args, env = _cli(model_dir, steps=4)
  result = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  root = epath.Path(model_dir)
  assert "train.total_steps" in (root / "config.gin").read_text()
  rows = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
  assert [row["step"] for row in rows if "loss" in row] == [1, 2, 3, 4]
  assert (root / "checkpoint_4" / "state").is_dir()


def test_vocabulary_on_gs_is_found_and_a_missing_one_named_in_one_line(gcs_server, tmp_path):
  """A gs:// vocabulary is checked before any dataset is built: there, it passes; missing,
  the one-line MissingPathError names it (without network the same check fails with 'not
  readable', test_cli_errors)."""
  from gqa_flax import errors  # pylint: disable=import-outside-toplevel
  from gqa_flax.data import vocab  # pylint: disable=import-outside-toplevel
  url = f"gs://{gcs_server.bucket}/vocab/spm.model"
  epath.Path(url).write_bytes(b"a model file")
  assert vocab.LazyPathVocabulary(url).check_found() == url
  missing = f"gs://{gcs_server.bucket}/vocab/nowhere.model"
  with pytest.raises(errors.MissingPathError, match=f"vocabulary not found at {missing}; set"):
    vocab.LazyPathVocabulary(missing).check_found()
