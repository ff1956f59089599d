"""Training metrics to the log, TensorBoard (tf.summary) and MODEL_DIR/metrics.jsonl.

On a pod only one host writes (`enabled`, the writer); the others compute the same numbers
and write nothing. MODEL_DIR may be a gs:// URL: object stores cannot append, so there the
jsonl file is rewritten whole at each write (a few KB per thousand steps).
"""
import json
import logging
import os
import time
from typing import Dict

import tensorflow as tf
from etils import epath

# TensorBoard's scalar-plugin tag, written with core tf.summary.write (no tensorboard package).
_SCALAR_METADATA = tf.compat.v1.SummaryMetadata(
    plugin_data=tf.compat.v1.SummaryMetadata.PluginData(plugin_name="scalars"))


class _JsonLines:
  """A jsonl file grown line by line: appended locally, rewritten whole on object stores."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._local = "://" not in str(path)
    self._text = "" if self._local or not path.exists() else path.read_text()

  def append(self, line: str) -> None:
    if self._local:
      with self._path.open("a") as f:
        f.write(line + "\n")
      return
    self._text += line + "\n"
    self._path.write_text(self._text)


class MetricsWriter:
  """Writes scalars per step; `log_progress` prints step, loss, LR, tokens/s and ETA."""

  def __init__(self, model_dir: str, start_step: int, total_steps: int, enabled: bool = True):
    self._enabled = enabled
    if enabled:
      self._jsonl = _JsonLines(epath.Path(model_dir) / "metrics.jsonl")
      self._summary = tf.summary.create_file_writer(os.path.join(model_dir, "train"))
    self._start_step, self._total_steps = start_step, total_steps
    self._start_time = self._last_time = time.time()
    self._last_step, self._tokens = start_step, 0.0

  def write(self, step: int, scalars: Dict[str, float]) -> None:
    if not self._enabled:
      return
    self._jsonl.append(json.dumps({"step": step, **scalars}))
    with self._summary.as_default(step=step):
      for name, value in scalars.items():
        tf.summary.write(name, tf.constant(value, tf.float32), metadata=_SCALAR_METADATA)
    self._summary.flush()

  def log_progress(self, step: int, loss: float, learning_rate: float, tokens: float) -> Dict[str, float]:
    """Logs one progress line; returns its throughput numbers."""
    now = time.time()
    tokens_per_s = tokens / max(now - self._last_time, 1e-9)
    steps_per_s = (step - self._start_step) / max(now - self._start_time, 1e-9)
    eta = (self._total_steps - step) / max(steps_per_s, 1e-9)
    if self._enabled:
      logging.info("step %d/%d  loss %.4f  lr %.3g  %.0f tokens/s  ETA %s", step, self._total_steps,
                   loss, learning_rate, tokens_per_s, time.strftime("%H:%M:%S", time.gmtime(eta)))
    self._last_time, self._last_step = now, step
    return {"tokens_per_second": tokens_per_s, "steps_per_second": steps_per_s}

  def close(self) -> None:
    if not self._enabled:
      return
    self._summary.close()
