"""Training restores every checkpoint format (RestoreCheckpointConfig, checkpointing.restore_from):
the real T5X legacy fixture, a T5X legacy run dir (latest step), our Orbax and T5X's Orbax
layouts, HF; formats without optimizer state restore params only."""
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from gqa_flax import checkpoints
from gqa_flax.checkpoints import t5x_legacy
from gqa_flax.checkpoints.arrays import flatten
from gqa_flax.training import adafactor, trainer
from gqa_flax.training.checkpointing import RestoreCheckpointConfig, restore_from
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner
from test_checkpoints import hf_dir  # noqa: F401  (pytest fixture)

T5X_TINY = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "t5x" / \
    "test_t5_tiny.checkpoint_0"
FINETUNE_MAP = ((r"state/param_states.*", None),)  # configs/runs/finetune.gin's


def _fresh_state(config):
  """A freshly initialised TrainState of `config` (seed 1), in the partitioner's shardings."""
  model, optimizer = EncoderDecoderModel(config), adafactor.adafactor()
  shapes = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}
  shardings = trainer.state_shardings(Partitioner(), optimizer, trainer.abstract_params(model, shapes))
  return trainer.init_train_state(model, optimizer, shapes, shardings, seed=1)


@pytest.fixture(scope="module")
def fresh_tiny():
  """A fresh TrainState of the fixture's config (restoring does not change it: shared)."""
  return _fresh_state(checkpoints.open_checkpoint(str(T5X_TINY)).config)


def _restore(path, fresh, **kwargs):
  config = RestoreCheckpointConfig(path=str(path), **kwargs)
  return config.checkpoint_dir(), restore_from(config, config.checkpoint_dir(), fresh)


def _assert_params(restored, expected):
  got = flatten(jax.device_get(restored.params))
  assert got.keys() == expected.keys()
  for name, value in expected.items():
    assert got[name].dtype == np.float32, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_finetuning_restores_the_real_t5x_legacy_fixture(fresh_tiny):
  """The msgpack file T5X wrote: params equal its arrays, its step, a fresh Adafactor state."""
  raw = flatten(serialization.msgpack_restore(T5X_TINY.read_bytes())["optimizer"]["target"])
  checkpoint, state = _restore(T5X_TINY, fresh_tiny, assignment_map=FINETUNE_MAP)
  assert checkpoint == str(T5X_TINY)
  _assert_params(state, raw)
  assert int(state.step) == 0
  assert jax.tree.all(jax.tree.map(lambda a, b: bool((a == b).all()), state.param_states,
                                   fresh_tiny.param_states))


def test_legacy_run_dir_means_its_latest_step_and_has_no_optimizer_state(tmp_path, fresh_tiny):
  _, params = checkpoints.load(str(T5X_TINY))
  for step, scale in ((3, 2.0), (7, 3.0)):  # zarr arrays (above 1000 bytes) and inline ones
    t5x_legacy.write_t5x_legacy(str(tmp_path / f"checkpoint_{step}"),
                                {n: v * scale for n, v in flatten(params).items()}, step,
                                inline_max_bytes=1000)
  checkpoint, state = _restore(tmp_path, fresh_tiny, mode="latest", assignment_map=FINETUNE_MAP)
  assert checkpoint == str(tmp_path / "checkpoint_7") and int(state.step) == 7
  _assert_params(state, {n: v * 3.0 for n, v in flatten(params).items()})
  with pytest.raises(ValueError, match=r"lacks \['state/param_states'\]"):
    _restore(tmp_path, fresh_tiny)


@pytest.mark.parametrize("layout", ["ours", "t5x"])
def test_orbax_checkpoints_restore_params_in_the_configured_dtype(tmp_path, layout, fresh_tiny):
  config, params = checkpoints.load(str(T5X_TINY))
  bf16 = jax.tree.map(lambda x: x.astype(jax.numpy.bfloat16), params)
  if layout == "ours":
    checkpoints.save(str(tmp_path), 5, bf16, config)
  else:  # T5X's Orbax checkpoints: the `state` item only.
    with ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
        step_prefix="checkpoint")) as manager:
      manager.save(5, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
          {"target": bf16, "state": {"step": np.int64(5)}})))
  checkpoint, state = _restore(tmp_path, fresh_tiny, assignment_map=FINETUNE_MAP)
  assert checkpoint == str(tmp_path / "checkpoint_5") and int(state.step) == 5
  _assert_params(state, {n: np.asarray(v, np.float32) for n, v in flatten(bf16).items()})


def test_hf_checkpoint_restores_params(hf_dir):  # noqa: F811
  path, _ = hf_dir
  config, params = checkpoints.load(path)
  fresh = _fresh_state(config)
  with pytest.raises(ValueError, match=r"lacks \['state/step'\]"):  # HF stores no step.
    _restore(path, fresh, assignment_map=FINETUNE_MAP)
  _, state = _restore(path, fresh, assignment_map=FINETUNE_MAP + ((r"state/step", None),))
  _assert_params(state, flatten(params))
  assert int(state.step) == 0
