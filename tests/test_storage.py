"""Checkpoints on gs:// against a local GCS server (tests/gcs_server.py): every client reaches
it, conversion SRC and DST, Orbax checkpoints and the trainer's CheckpointManager."""
import numpy as np
import tensorflow as tf
import tensorstore as ts
from etils import epath


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
