"""Open any supported checkpoint as lazily read arrays; `load` reads them all.

Formats (detected from the files):
  'orbax'      our Orbax CheckpointManager layout (MODEL_DIR or one `checkpoint_<step>` of it)
               and T5X's Orbax checkpoints (no `config` item: the config is inferred);
  't5x_legacy' a T5X `checkpoint_<step>/` directory with the msgpack file `checkpoint`, or that
               msgpack file itself;
  'hf'         a HF transformers T5 v1.1 directory (config.json + model.safetensors).

A checkpoint root (a directory of `checkpoint_<step>` checkpoints: MODEL_DIR, a T5X run dir)
means its latest step. Paths may be local or URLs (`gs://`, see `paths`).
"""
import dataclasses
from typing import Any, Dict, Optional

import numpy as np
from etils import epath

from gqa_flax import errors
from gqa_flax.checkpoints import hf, orbax_format, paths, t5x_legacy
from gqa_flax.checkpoints.arrays import LazyArray, guarded, unflatten
from gqa_flax.checkpoints.shapes import check_shapes, config_from_shapes
from gqa_flax.models.config import T5Config


@dataclasses.dataclass
class CheckpointSource:
  """A checkpoint whose parameters have not been read yet."""
  path: str  # The checkpoint itself (a root's latest step).
  format: str
  config: T5Config
  arrays: Dict[str, LazyArray]  # T5X names joined by '/' -> parameter.
  step: Optional[int] = None
  metadata: Optional[Dict[str, Any]] = None


@dataclasses.dataclass
class LoadedCheckpoint:
  config: T5Config
  params: Dict[str, Any]  # Nested dict of numpy arrays, T5X names.
  step: Optional[int] = None
  metadata: Optional[Dict[str, Any]] = None


def checkpoint_format(path: str) -> Optional[str]:
  """'hf', 'orbax' or 't5x_legacy' if `path` is itself a checkpoint of that format, else None."""
  if hf.is_hf_checkpoint(path):
    return "hf"
  if orbax_format.is_step_dir(path):
    return "orbax"
  return "t5x_legacy" if t5x_legacy.msgpack_file(path) else None


def resolve(path: str) -> Optional[str]:
  """The checkpoint `path` names: itself, or a checkpoint root's latest step; None if neither."""
  if checkpoint_format(path):
    return path
  steps = paths.step_dirs(path)
  return next((steps[step] for step in sorted(steps, reverse=True)
               if checkpoint_format(steps[step])), None)


def open_checkpoint(path: str) -> CheckpointSource:
  """Detects the format of `path` and lists its parameters; checks names and shapes."""
  if not epath.Path(path).exists():
    raise errors.MissingPathError(f"checkpoint {path} does not exist; check the path")
  checkpoint = resolve(path)
  if checkpoint is None:
    raise errors.UserError(
        f"{path} is not a recognised checkpoint: expected an Orbax checkpoint directory, a T5X "
        f"checkpoint_<step> directory (or its msgpack file), a HF T5 directory with "
        f"{hf.CONFIG_FILE} and {hf.WEIGHTS_FILE}, or a directory of checkpoint_<step> ones")
  kind = checkpoint_format(checkpoint)
  if kind == "hf":
    config, arrays = hf.open_hf(checkpoint)
    source = CheckpointSource(checkpoint, kind, config, arrays)
  elif kind == "orbax":
    config, arrays, step, metadata = orbax_format.open_orbax(checkpoint)
    source = CheckpointSource(checkpoint, kind, config, arrays, step, metadata)
  else:
    arrays, step = t5x_legacy.open_t5x_legacy(checkpoint)
    source = CheckpointSource(checkpoint, kind, None, arrays, step)
  source.arrays = {name: guarded(array, f"{checkpoint} (array {name})")
                   for name, array in source.arrays.items()}
  if source.config is None:  # T5X checkpoints store no config.
    source.config = config_from_shapes({n: a.shape for n, a in source.arrays.items()}, path)
  check_shapes(source.config, {n: a.shape for n, a in source.arrays.items()}, path)
  return source


def load_checkpoint(path: str) -> LoadedCheckpoint:
  """Reads the whole checkpoint at `path` (any supported format) into memory."""
  source = open_checkpoint(path)
  params = unflatten({name: np.asarray(array.read()) for name, array in source.arrays.items()})
  return LoadedCheckpoint(source.config, params, source.step, source.metadata)


def load(path: str):
  """-> (T5Config, params) of the checkpoint at `path`; params is a nested dict of arrays."""
  checkpoint = load_checkpoint(path)
  return checkpoint.config, checkpoint.params
