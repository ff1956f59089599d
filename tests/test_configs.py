"""Every gin file under configs/ parses and binds; XXL models are built only as abstract shapes."""
import glob
import os

import gin
import jax
import numpy as np
import pytest

from gqa_flax.training import gin_utils, trainer

CONFIGS = gin_utils.CONFIGS_DIR
TASKS = sorted(glob.glob(os.path.join(CONFIGS, "experiments", "tasks", "*.gin")))
# Files that need others first (a run needs a model, a task file needs a finetune experiment).
PREFIX = {"runs": ["models/t5_1_1/tiny.gin"], "attention": ["models/t5_1_1/xxl.gin"],
          "tasks": ["experiments/finetune_gqa8_xxl.gin"], "plan": ["models/t5_1_1/tiny.gin"],
          "reproduce": ["models/t5_1_1/tiny.gin"], "mini": ["models/t5_1_1/tiny.gin"],
          "smoke": ["models/t5_1_1/tiny.gin"], "paper": ["models/t5_1_1/tiny.gin"]}
ALL = sorted(os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.gin"),
                                                            recursive=True))
# T5X sizes (emb, heads, head_dim, mlp, layers) -> parameter counts of T5.1.1 (32128 vocab).
XXL_PARAMS = 11_135_332_352


def _files(name):
  group = name.split(os.sep)[-2]
  return PREFIX.get(group, []) + [name]


def _parameter_count(model) -> int:
  """Counts the parameters of the model's abstract init (nothing allocated)."""
  boxed = trainer.abstract_params(model, {"encoder_input_tokens": (1, 1),
                                          "decoder_input_tokens": (1, 1)})
  leaves = jax.tree.leaves(trainer.nn.meta.unbox(boxed))
  assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
  return sum(int(np.prod(x.shape)) for x in leaves)


# Tracing an XXL init takes ~2 s; the 47 files bind 16 configs, each traced once.
_COUNTS = {}


def _parse(files):
  gin.clear_config()
  gin_utils.parse_gin(files, [])


@pytest.mark.parametrize("name", ALL)
def test_gin_file_parses_and_builds_model(name):
  _parse(_files(name))
  if name.endswith("models/t5_1_1/model.gin"):
    gin.clear_config()
    return
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  key = (type(model), model.config)
  if key not in _COUNTS:
    _COUNTS[key] = _parameter_count(model)
  count = _COUNTS[key]
  cfg = model.config
  if "xxl" in name or "attention" in name:
    kv_saved = 2 * cfg.num_decoder_layers * 2 * cfg.emb_dim * (cfg.num_heads - cfg.num_kv_heads) * cfg.head_dim
    assert count == XXL_PARAMS - kv_saved
  gin.clear_config()


def test_includes_resolve_beside_a_same_named_folder(tmp_path, monkeypatch):
  """A folder `runs/` in the working directory (a run's output) must not shadow configs/runs/."""
  (tmp_path / "runs").mkdir()
  monkeypatch.chdir(tmp_path)
  _parse(["models/t5_1_1/tiny.gin", "reproduce/mini/pretrain.gin"])  # includes runs/pretrain.gin
  assert gin.query_parameter("train.stats_period") > 0
  gin.clear_config()


@pytest.mark.parametrize("name,kv_heads,steps", [("experiments/uptrain_xxl_mqa.gin", 1, 1_050_000),
                                                 ("experiments/uptrain_xxl_gqa8.gin", 8, 1_050_000)])
def test_uptrain_experiments(name, kv_heads, steps):
  _parse([name])
  assert gin.query_parameter("%TRAIN_STEPS") == steps == int(1_000_000 * 1.05)
  model = gin.query_parameter("%MODEL").scoped_configurable_fn()
  assert (model.config.num_kv_heads, model.config.cross_num_kv_heads) == (kv_heads, kv_heads)
  assert gin.query_parameter("RestoreCheckpointConfig.assignment_map") == (
      (r"state/param_states.*", None),)
  assert gin.query_parameter("create_learning_rate_scheduler.factors") == "constant * rsqrt_decay"
  gin.clear_config()


@pytest.mark.parametrize("task", TASKS)
def test_finetune_tasks_use_paper_lengths(task):
  from gqa_flax.data.tasks import PAPER_FEATURE_LENGTHS
  _parse(_files(os.path.relpath(task, CONFIGS)))
  name = gin.query_parameter("%MIXTURE_OR_TASK_NAME")
  assert gin.query_parameter("%TASK_FEATURE_LENGTHS") == PAPER_FEATURE_LENGTHS[name]
  assert gin.query_parameter("%DROPOUT_RATE") == 0.1
  assert gin.query_parameter("create_learning_rate_scheduler.base_learning_rate") == 0.001
  assert gin.query_parameter("%BATCH_SIZE") == 128
  gin.clear_config()
