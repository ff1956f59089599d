"""Result files (JSON) written whole, on local disk or an object store (`gs://`): a reader
never sees half a file."""
import json
import os
from typing import Any

from etils import epath


def write_json(path: str, data: Any) -> None:
  """Writes `data` to `path` at once: a local file through a temporary file renamed into
  place, an object store's (gs://) in one object write (atomic there)."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps(data, indent=2)
  if "://" in str(path):
    path.write_text(text)
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text)
  os.replace(tmp, path)
