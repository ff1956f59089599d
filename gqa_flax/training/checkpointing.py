"""Orbax checkpoints of MODEL_DIR and T5X-style restoring (T5X `utils.RestoreCheckpointConfig`).

Layout (shared with gqa_flax/checkpoints/orbax_format.py): `MODEL_DIR/checkpoint_<step>/` with
the items `state` = {'target': params, 'state': {'step', 'param_states'}}, `config` (JSON of
the T5Config) and `dataset` (JSON: number of batches this run's data iterator has consumed).

* `Checkpointer` saves asynchronously every `period` steps, keeps `keep` (or the `keep` best by
  a dev metric), and resumes from MODEL_DIR's latest committed step: a save interrupted by any
  signal, SIGKILL included, leaves only an uncommitted temporary directory that Orbax ignores.
* `restore_from` reads another checkpoint into a freshly initialised state following a
  `RestoreCheckpointConfig`: assignment_map entries `(regex, None)` keep the fresh value of
  the matching state paths ('target/...', 'state/step', 'state/param_states'), entries
  `(regex, replacement)` read `re.sub(regex, replacement, path)` from the checkpoint. Uptraining
  uses `((r'state/param_states.*', None),)`: converted params, fresh Adafactor state and the
  step counter of the checkpoint. The optimizer state is restored or kept fresh as a whole.
  The checkpoint may be of any format `gqa_flax.checkpoints` reads: Orbax (ours, T5X's), T5X
  legacy (msgpack + zarr), HF. The last two hold no optimizer state ('target/...' and, for
  T5X legacy, 'state/step' only), so restoring them needs `state/param_states` kept fresh.
  Every value is read straight into the fresh state's sharding, each process reading only its
  devices' shards. MODEL_DIR and the restored checkpoint may be gs:// URLs.
"""
import dataclasses
import os
import re
from typing import Any, Dict, Optional, Sequence, Tuple

import gin
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from gqa_flax import errors
from gqa_flax.checkpoints import orbax_format, paths, reader
from gqa_flax.checkpoints.arrays import LazyArray, in_memory, unflatten
from gqa_flax.checkpoints.sharded import read_sharded
from gqa_flax.models import T5Config, config_to_dict
from gqa_flax.training.trainer import TrainState

DATASET_ITEM = "dataset"
_OPTIMIZER_PATH = "state/param_states"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class SaveCheckpointConfig:
  """period: steps between saves; steps: further steps to save at (e.g. every uptraining
  proportion alpha of one run); keep: how many to keep (None: all). A run also saves its last
  step; unlike Orbax's default it does not save its first.

  With `metric_name_to_monitor` (e.g. 'inference_eval/gqa_cnn_dailymail/rouge1', see
  `evaluation.inference_metric_name`), the `keep` best checkpoints by that metric are kept
  (`metric_mode` 'max' or 'min'), like T5X's `SaveBestCheckpointer`; checkpoints saved without
  metrics are kept too.
  """
  period: int = 1000
  steps: Sequence[int] = ()
  keep: Optional[int] = None
  metric_name_to_monitor: Optional[str] = None
  metric_mode: str = "max"


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RestoreCheckpointConfig:
  """T5X's RestoreCheckpointConfig: where to initialise a run that has no checkpoint yet.

  path: a checkpoint of any supported format (an Orbax or T5X checkpoint_<step> directory, a
    T5X msgpack file, a HF directory), or a directory of checkpoint_<step> ones (MODEL_DIR, a
    T5X run dir), which means its latest step; local or a gs:// URL.
  mode: T5X's 'specific' or 'latest'; both take either kind of `path`.
  assignment_map: ((regex, None | replacement), ...) over state paths, see module docstring.
  fallback_to_scratch: start from scratch when `path` has no checkpoint instead of failing.
  dtype: dtype of the restored params.
  """
  path: Optional[str] = None
  mode: str = "specific"
  assignment_map: Optional[Sequence[Tuple[str, Optional[str]]]] = None
  fallback_to_scratch: bool = False
  dtype: str = "float32"

  def __post_init__(self):
    if self.mode not in ("specific", "latest"):
      raise errors.UserError(
          f"RestoreCheckpointConfig.mode={self.mode!r}: use 'specific' or 'latest'")

  def checkpoint_dir(self) -> Optional[str]:
    """The checkpoint to restore, None for scratch; raises if it must exist and doesn't."""
    if self.path is None:
      return None
    checkpoint = reader.resolve(self.path)
    if checkpoint is None and not self.fallback_to_scratch:
      raise errors.MissingPathError(
          f"restore path {self.path} is not a checkpoint_<step> directory (Orbax, T5X), a T5X "
          "msgpack file, a HF T5 directory or a directory of checkpoint_<step> ones; fix "
          "INITIAL_CHECKPOINT_PATH / RestoreCheckpointConfig.path, or set fallback_to_scratch=True")
    return checkpoint


def _path(key_path) -> str:
  """'/'-joined names of a jax key path, as orbax names checkpoint entries."""
  names = []
  for key in key_path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        names.append(str(getattr(key, attr)))
        break
  return "/".join(names)


def _flat(tree: Any) -> Dict[str, Any]:
  return {_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def checkpoint_tree(state: TrainState) -> dict:
  """The `state` item layout of a TrainState."""
  return {orbax_format.PARAMS_KEY: state.params,
          "state": {"step": state.step, "param_states": state.param_states}}


def _source(path: str, assignment_map) -> Optional[str]:
  """The checkpoint path feeding state path `path`, or None to keep the fresh value."""
  for pattern, replacement in assignment_map or ():
    if re.fullmatch(pattern, path):
      return None if replacement is None else re.sub(pattern, replacement, path)
  return path


def _state_arrays(path: str) -> Dict[str, LazyArray]:
  """The state paths a T5X legacy or HF checkpoint holds: 'target/...' and 'state/step'."""
  source = reader.open_checkpoint(path)
  arrays = {f"{orbax_format.PARAMS_KEY}/{name}": array for name, array in source.arrays.items()}
  if source.step is not None:
    arrays["state/step"] = in_memory(np.int32(source.step))
  return arrays


def _restores_optimizer(config: RestoreCheckpointConfig) -> bool:
  return _source(_OPTIMIZER_PATH, config.assignment_map) is not None


def _requests(config: RestoreCheckpointConfig, available: Dict[str, Any], wanted: Dict[str, Any],
              where: str) -> Dict[str, Tuple[str, Any]]:
  """{checkpoint path: (state path, fresh leaf)} to read; raises naming missing or mis-shaped."""
  requests, missing = {}, []
  for path, leaf in wanted.items():
    source = None if path.startswith(_OPTIMIZER_PATH) else _source(path, config.assignment_map)
    if source is None:
      continue
    if source not in available:
      missing.append(source)
      continue
    if tuple(available[source].shape) != leaf.shape:
      raise errors.UserError(f"{where}: {source} has shape {tuple(available[source].shape)}, the "
                             f"model's {path} is {leaf.shape}; check the model config "
                             "(size, num_kv_heads) against the checkpoint's")
    requests[source] = (path, leaf)
  if _restores_optimizer(config) and not any(p.startswith(_OPTIMIZER_PATH) for p in available):
    missing.append(_OPTIMIZER_PATH)
  if missing:
    raise errors.UserError(f"{where} lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                           "to keep fresh values add e.g. (r'state/param_states.*', None) to "
                           "RestoreCheckpointConfig.assignment_map")
  return requests


def _dtype(dest: str, leaf: Any, params_dtype: jnp.dtype) -> jnp.dtype:
  return params_dtype if dest.startswith(orbax_format.PARAMS_KEY) else leaf.dtype


def _restore_orbax(config: RestoreCheckpointConfig, directory: str, fresh: TrainState):
  """(values {state path: array}, param_states) read from the Orbax step `directory`."""
  state_dir = os.path.join(directory, orbax_format.STATE_ITEM)
  available = _flat(ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata.tree)
  requests = _requests(config, available, _flat(checkpoint_tree(fresh)), directory)
  items = {src: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
           for src, (_, leaf) in requests.items()}
  args = {src: ocp.ArrayRestoreArgs(sharding=leaf.sharding, global_shape=leaf.shape,
                                    dtype=_dtype(dest, leaf, jnp.dtype(config.dtype)))
          for src, (dest, leaf) in requests.items()}
  if _restores_optimizer(config):
    optimizer_tree = checkpoint_tree(fresh)["state"]["param_states"]
    items[_OPTIMIZER_PATH] = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), optimizer_tree)
    args[_OPTIMIZER_PATH] = ocp.checkpoint_utils.construct_restore_args(items[_OPTIMIZER_PATH])
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=unflatten(items), restore_args=unflatten(args), partial_restore=True))
  restored_flat = _flat(restored)
  param_states = (restored["state"]["param_states"] if _restores_optimizer(config)
                  else fresh.param_states)
  return {dest: restored_flat[src] for src, (dest, _) in requests.items()}, param_states


def _restore_arrays(config: RestoreCheckpointConfig, path: str, fresh: TrainState):
  """(values, fresh param_states) read from a T5X legacy or HF checkpoint, shard by shard."""
  available = _state_arrays(path)
  requests = _requests(config, available, _flat(checkpoint_tree(fresh)), path)
  values = {dest: read_sharded(available[src], leaf.sharding,
                               _dtype(dest, leaf, jnp.dtype(config.dtype)))
            for src, (dest, leaf) in requests.items()}
  return values, fresh.param_states


def restore_from(config: RestoreCheckpointConfig, path: str, fresh: TrainState) -> TrainState:
  """`fresh` with the entries `config` selects replaced by those of checkpoint `path`.

  path: a checkpoint as `RestoreCheckpointConfig.checkpoint_dir` returns it (any format).
  """
  restore = _restore_orbax if reader.checkpoint_format(path) == "orbax" else _restore_arrays
  values, param_states = restore(config, path, fresh)
  new = {name: values.get(name, leaf) for name, leaf in _flat(checkpoint_tree(fresh)).items()
         if not name.startswith(_OPTIMIZER_PATH)}
  tree = unflatten(new)
  return TrainState(step=jnp.asarray(tree["state"]["step"], jnp.int32),
                    params=tree[orbax_format.PARAMS_KEY], param_states=param_states)


def _save_policy(save: SaveCheckpointConfig) -> "ocp.checkpoint_managers.SaveDecisionPolicy":
  """Every `period` steps, at `steps`, and when preempted (Orbax's default without its save
  of a run's first step)."""
  policies = ocp.checkpoint_managers
  return policies.AnySavePolicy([
      policies.FixedIntervalPolicy(save.period),
      policies.SpecificStepsPolicy(tuple(save.steps)),
      policies.PreemptionCheckpointingPolicy()])


class Checkpointer:
  """MODEL_DIR's CheckpointManager: async saves every `period` steps, resume from the latest."""

  def __init__(self, model_dir: str, save: SaveCheckpointConfig):
    best = self.metric_name = save.metric_name_to_monitor
    if save.metric_mode not in ("max", "min"):
      raise errors.UserError(
          f"SaveCheckpointConfig.metric_mode={save.metric_mode!r}: use 'max' or 'min'")
    options = ocp.CheckpointManagerOptions(
        step_prefix=orbax_format.STEP_PREFIX, max_to_keep=save.keep,
        save_decision_policy=_save_policy(save), enable_async_checkpointing=True,
        best_fn=None if best is None else (lambda metrics: metrics[best]),
        best_mode=save.metric_mode, keep_checkpoints_without_metrics=True,
        create=False)  # the caller creates MODEL_DIR once the run's settings are checked
    self.manager = ocp.CheckpointManager(paths.absolute(model_dir), options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, state: TrainState, config: T5Config, batches_consumed: int,
           metrics: Optional[Dict[str, float]] = None, force: bool = False) -> bool:
    """Starts an async save of step `state.step` when due (or `force`); True if it started."""
    step = int(state.step)
    if (metrics is not None and self.metric_name is not None and self.metric_name not in metrics
        and (force or self.manager.should_save(step))):
      raise errors.UserError(
          f"the monitored metric {self.metric_name!r} is not among the step's "
          f"metrics {sorted(metrics)}; fix SaveCheckpointConfig."
          "metric_name_to_monitor (inference_eval/* needs infer_eval_dataset_cfg)")
    return self.manager.save(
        step, force=force, metrics=metrics, args=ocp.args.Composite(**{
            orbax_format.STATE_ITEM: ocp.args.StandardSave(checkpoint_tree(state)),
            orbax_format.CONFIG_ITEM: ocp.args.JsonSave(config_to_dict(config)),
            DATASET_ITEM: ocp.args.JsonSave({"batches_consumed": batches_consumed})}))

  def restore_latest(self, abstract_state: TrainState) -> Tuple[TrainState, int]:
    """(state, batches consumed) of the latest step, in the shardings of `abstract_state`."""
    step = self.manager.latest_step()
    restored = self.manager.restore(step, args=ocp.args.Composite(**{
        orbax_format.STATE_ITEM: ocp.args.StandardRestore(checkpoint_tree(abstract_state)),
        DATASET_ITEM: ocp.args.JsonRestore()}))
    tree = restored[orbax_format.STATE_ITEM]
    state = TrainState(step=tree["state"]["step"], params=tree[orbax_format.PARAMS_KEY],
                       param_states=tree["state"]["param_states"])
    return state, int(restored[DATASET_ITEM]["batches_consumed"])

  def wait_until_finished(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """T5X's CheckpointConfig: how to save, and where a fresh run is initialised from."""
  save: SaveCheckpointConfig = SaveCheckpointConfig()
  restore: RestoreCheckpointConfig = RestoreCheckpointConfig()
