"""Checkpoint paths on local disk or on any filesystem etils.epath knows (`gs://bucket/dir`).

Readers and writers open files and list directories with `etils.epath.Path` (the `os` functions
for local paths; tf.io.gfile for gs:// when TensorFlow is installed) and join names with
`os.path.join`, which keeps URLs intact; `absolute` replaces `os.path.abspath`, which does not.
TensorStore opens URLs with its own drivers (`gcs` for gs://): `kvstore`.
"""
import os
import re
from typing import Any, Dict, Union

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_STEP_NAME = re.compile(r"checkpoint_(\d+)")


def is_url(path: str) -> bool:
  return bool(_URL.match(os.fspath(path)))


def absolute(path: str) -> str:
  """`path` made absolute (local) or kept as given without a trailing '/' (URL)."""
  path = os.fspath(path)
  return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def kvstore(path: str) -> Union[str, Dict[str, Any]]:
  """The TensorStore kvstore of directory `path`: the `file` driver, or the URL's own driver."""
  return path.rstrip("/") + "/" if is_url(path) else {"driver": "file", "path": path}


def step_dirs(root: str) -> Dict[int, str]:
  """{step: path} of the `checkpoint_<step>` entries of directory `root` (none if not one)."""
  root = epath.Path(root)
  if not root.is_dir():
    return {}
  return {int(m.group(1)): os.path.join(os.fspath(root), child.name) for child in root.iterdir()
          if (m := _STEP_NAME.fullmatch(child.name))}
