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
