"""Our Orbax checkpoint layout (shared with the trainer), written and read array by array.

MODEL_DIR is managed by `orbax.checkpoint.CheckpointManager(MODEL_DIR,
options=CheckpointManagerOptions(step_prefix='checkpoint'))`; step `s` lives in
`MODEL_DIR/checkpoint_<s>/` with the composite items

  state     PyTree {'target': params (T5X names), 'state': {'step', 'param_states'}}
            (T5X's own Orbax checkpoints use the same item; converted checkpoints carry no
            optimizer state, so `param_states` is absent);
  config    JSON `config_to_dict(T5Config)` (T5X checkpoints have none: it is inferred);
  metadata  JSON provenance of a converted checkpoint (optional).

Writing streams: `save` accepts LazyArray leaves, and `LazyArrayHandler` reads, writes and
drops them one at a time, row block by row block, inside Orbax's own serialization, so the
files are what Orbax writes for numpy arrays (type 'np.ndarray'; arrays above BLOCK_BYTES
are chunked in bands of whole rows) and any Orbax restore reads them.
Reading streams too: `open_orbax` lists arrays from the checkpoint's metadata and reads each
with a partial restore of that one leaf; `restore_sharded` restores them straight into
shardings (each process reads the shards its devices hold). Directories may be local or
`gs://` URLs (Orbax and TensorStore take them as they are; see `paths`); a step counts once
Orbax has finalized it (renamed from its temporary name, or on GCS, its commit_success.txt).
"""
import logging
import os
import re
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint._src.serialization import type_handler_registry, type_handlers

from gqa_flax import errors
from gqa_flax.checkpoints import paths
from gqa_flax.checkpoints.arrays import LazyArray, flatten, unflatten
from gqa_flax.models.config import T5Config, config_from_dict, config_to_dict

STEP_PREFIX = "checkpoint"
STATE_ITEM = "state"
CONFIG_ITEM = "config"
METADATA_ITEM = "metadata"
PARAMS_KEY = "target"


class _DropThreadLogsOfUserErrors(logging.Filter):
  """A LazyArray read fails as a UserError in an Orbax writer thread; Orbax logs it with its
  traceback, then raises it in the caller, whose command prints it in one line. The log goes."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and isinstance(record.exc_info[1], errors.UserError))


logging.getLogger("absl").addFilter(_DropThreadLogsOfUserErrors())


class LazyArrayHandler(type_handlers.NumpyHandler):
  """Orbax TypeHandler writing LazyArrays as numpy arrays, one row block in memory at a time.

  Orbax builds each array's TensorStore spec as for a numpy array; arrays above BLOCK_BYTES
  get zarr chunks of `block_rows()` whole rows, so that each block written fills whole chunks.
  """

  def __init__(self):
    super().__init__(deepcopy_host_arrays=False)

  async def _background_serialize(self, values, infos, args=None):
    args = args or [ocp.SaveArgs()] * len(values)
    for value, info, arg in zip(values, infos, args):  # One array at a time.
      await super()._background_serialize([value], [info], [arg])

  async def _open_and_write(self, value: LazyArray, tspec: Dict[str, Any],
                            ts_context: ts.Context):
    if not value.shape:
      return await super()._open_and_write(value.read(), tspec, ts_context)
    rows = value.block_rows()
    if rows < value.shape[0]:
      tspec = dict(tspec, metadata=dict(tspec["metadata"], chunks=[rows, *value.shape[1:]]))
    store = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
    for start, block in zip(range(0, value.shape[0], rows), value.blocks(rows)):
      rows_written = store[start:start + len(block)]
      await rows_written.write(block, can_reference_source_data_indefinitely=True)


def _state_handler() -> ocp.PyTreeCheckpointHandler:
  """Orbax's PyTree handler that also writes LazyArrays (a private registry: no global change)."""
  defaults = [(ty, ocp.type_handlers.get_type_handler(ty))
              for ty in (int, float, bytes, np.number, np.ndarray, jax.Array, str)]
  registry = type_handler_registry.create_type_handler_registry(
      (LazyArray, LazyArrayHandler()), *defaults)
  return ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                     multiprocessing_options=_alone())


def _alone() -> ocp.options.MultiprocessingOptions:
  """Orbax options for work this process does by itself: on a pod one host converts (reads and
  writes host-held arrays), so Orbax must not wait for the others at its barriers."""
  return ocp.options.MultiprocessingOptions(primary_host=jax.process_index(),
                                            active_processes={jax.process_index()})


def _pytree_checkpointer() -> ocp.Checkpointer:
  """A PyTree checkpointer for this process alone (metadata and host-side reads)."""
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=_alone()),
                          multiprocessing_options=_alone())


def checkpoint_manager(directory: str) -> ocp.CheckpointManager:
  """A manager that this process uses alone (see `_alone`)."""
  alone = _alone()
  directory = paths.absolute(directory)
  epath.Path(directory).mkdir(parents=True, exist_ok=True)  # Orbax won't, for one process
  return ocp.CheckpointManager(
      directory, options=ocp.CheckpointManagerOptions(
          step_prefix=STEP_PREFIX, multiprocessing_options=alone, create=False),
      item_handlers={STATE_ITEM: _state_handler(),
                     CONFIG_ITEM: ocp.JsonCheckpointHandler(multiprocessing_options=alone),
                     METADATA_ITEM: ocp.JsonCheckpointHandler(multiprocessing_options=alone)})


def save(directory: str, step: int, params: Dict[str, Any], config: T5Config,
         metadata: Optional[Dict[str, Any]] = None) -> None:
  """Writes `params` (nested dict of arrays or LazyArrays) as step `step` of MODEL_DIR `directory`."""
  items = {STATE_ITEM: ocp.args.PyTreeSave({PARAMS_KEY: params, "state": {"step": np.int64(step)}}),
           CONFIG_ITEM: ocp.args.JsonSave(config_to_dict(config))}
  if metadata is not None:
    items[METADATA_ITEM] = ocp.args.JsonSave(metadata)
  with checkpoint_manager(directory) as manager:
    manager.save(step, args=ocp.args.Composite(**items))
    manager.wait_until_finished()


def is_step_dir(path: str) -> bool:
  """Whether `path` is a finalized Orbax step directory with a `state` item."""
  return epath.Path(path, STATE_ITEM, "_METADATA").is_file() and ocp.step.is_path_finalized(path)


def step_dir(path: str) -> Optional[str]:
  """The step directory of an Orbax checkpoint at `path` (MODEL_DIR: latest step), or None."""
  if is_step_dir(path):
    return path
  steps = paths.step_dirs(path)
  return next((steps[step] for step in sorted(steps, reverse=True) if is_step_dir(steps[step])),
              None)


def _read_json(directory: str) -> Optional[dict]:
  if not epath.Path(directory).is_dir():
    return None
  with errors.reading(directory):
    return ocp.Checkpointer(ocp.JsonCheckpointHandler(multiprocessing_options=_alone()),
                            multiprocessing_options=_alone()).restore(directory)


def _leaf_reader(state_dir: str, name: str, metadata) -> LazyArray:
  """A LazyArray reading only the parameter `name` ('a/b/c' under 'target')."""
  keys = [PARAMS_KEY] + name.split("/")

  def read():
    item = unflatten({"/".join(keys): 0})
    restore_args = unflatten({"/".join(keys): ocp.RestoreArgs(restore_type=np.ndarray)})
    tree = _pytree_checkpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                partial_restore=True))
    for key in keys:
      tree = tree[key]
    return np.asarray(tree)

  return LazyArray(tuple(metadata.shape), np.dtype(metadata.dtype), read)


def open_orbax(path: str) -> Tuple[Optional[T5Config], Dict[str, LazyArray], int, Optional[dict]]:
  """(config or None for T5X's, {name: LazyArray}, step, metadata) of an Orbax checkpoint."""
  directory = paths.absolute(step_dir(path))  # Orbax needs absolute paths.
  state_dir = os.path.join(directory, STATE_ITEM)
  with errors.reading(os.path.join(state_dir, "_METADATA")):
    tree = _pytree_checkpointer().metadata(state_dir).item_metadata.tree
  if PARAMS_KEY not in tree:
    raise errors.UserError(f"{state_dir}: no '{PARAMS_KEY}' (parameters) in the Orbax state item")
  arrays = {name: _leaf_reader(state_dir, name, leaf)
            for name, leaf in flatten(tree[PARAMS_KEY]).items()}
  config = _read_json(os.path.join(directory, CONFIG_ITEM))
  step = int(re.search(r"(\d+)$", os.path.basename(directory)).group(1))
  return (None if config is None else config_from_dict(config), arrays, step,
          _read_json(os.path.join(directory, METADATA_ITEM)))


def restore_sharded(path: str, abstract: Dict[str, jax.ShapeDtypeStruct]) -> Dict[str, jax.Array]:
  """{name: global jax.Array} of the parameters `abstract` names, in its shardings and dtypes.

  abstract: {'/'-joined parameter name: ShapeDtypeStruct with a sharding}. Orbax reads each
  array's shards for this process's devices only and casts them while reading.
  """
  keys = {name: f"{PARAMS_KEY}/{name}" for name in abstract}
  args = {keys[name]: ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                           dtype=leaf.dtype) for name, leaf in abstract.items()}
  state_dir = os.path.join(paths.absolute(step_dir(path)), STATE_ITEM)
  with errors.reading(state_dir):
    restored = ocp.PyTreeCheckpointer().restore(
        state_dir, args=ocp.args.PyTreeRestore(
            item=unflatten({keys[n]: a for n, a in abstract.items()}),
            restore_args=unflatten(args), partial_restore=True))
  return flatten(restored[PARAMS_KEY])
