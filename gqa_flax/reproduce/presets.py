"""Reproduction presets: a gin file under configs/reproduce/ binds `Preset`.

A variant is a tuple (model, kv_heads, alpha, method): `model` names an entry of
`Preset.models`, kv_heads None keeps multi-head attention, alpha is the uptraining
proportion of the pre-training steps and method the conversion (`gqa-convert --method`:
mean, first, random, grouped, aligned).
"""
import dataclasses
import os
from typing import Dict, Optional, Sequence, Tuple

import gin

from gqa_flax import errors
from gqa_flax.checkpoints.convert import METHODS

PRESETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs", "reproduce")


@dataclasses.dataclass(frozen=True)
class Variant:
  model: str
  kv_heads: Optional[int]
  alpha: float
  method: str

  @property
  def attention(self) -> str:
    if self.kv_heads is None:
      return "MHA"
    return "MQA" if self.kv_heads == 1 else f"GQA-{self.kv_heads}"

  @property
  def attention_id(self) -> str:
    """'mha', 'mqa' or 'gqaG'."""
    return self.attention.lower().replace("-", "")

  @property
  def label(self) -> str:
    return f"{self.attention}-{self.model}"

  @property
  def key(self) -> str:
    """A file-name-safe id, e.g. 'xxl-gqa8-a0.05-mean' or 'large-mha'."""
    if self.kv_heads is None:
      return f"{self.model}-{self.attention_id}".lower()
    return f"{self.model}-{self.attention_id}-a{self.alpha:g}-{self.method}".lower()


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Preset:
  """One reproduction setup; gin files under configs/reproduce/ bind every field.

  models: model name -> model gin file (configs/models/...).
  checkpoints: model name -> pre-trained checkpoint; models without one are pre-trained
    from scratch with `pretrain_gin` for `pretrain_steps` steps.
  pretrain_steps: the (original) pre-training steps; uptraining runs alpha * this more.
  uptrain_gin, finetune_gin: run gin files of the uptraining and fine-tuning stages.
  finetune_steps: fine-tuning steps after the starting checkpoint's step.
  tasks: seqio task name -> gin file setting MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS.
  bindings: extra gin bindings of every training run (e.g. shrinking a smoke run).
  variants: (model, kv_heads, alpha, method) tuples; Table 1's rows are `table_variants`.
  finetune_variants: the variants fine-tuned on `tasks` and decoded (the table's rows);
    empty: every variant. The others are measured by their held-out loss only (the sweeps).
  prepare: options of `gqa_flax.data.prepare --mini` ({} prepares nothing).
  eval_examples, eval_batch_size: test examples scored per task, decoding batch.
  heldout_task_gin, heldout_examples, heldout_batch_size: the held-out loss stage (the claims'
    measure): every variant's loss, right after conversion and after uptraining, on the first
    `heldout_examples` validation examples of the task gin file's task (0: no such stage).
  calibration_examples: `aligned` conversions align the heads in the metric of their
    key/value inputs on the first this many train examples of `heldout_task_gin`'s task (the
    pre-training task; `gqa-convert --calibration_task_gin`); 0: on the kernels alone.
  seeds: the seeds of everything after pre-training that is random: the `random` conversion,
    the uptraining and fine-tuning data order and dropout (RANDOM_SEED). Each seed is a run of
    its own (stage names end in -s<seed>); the claims' intervals combine them.
  timing_repeats: timed repeats of one decoding batch (median; compilation excluded).
  fig6: {'model', 'groups', 'inputs', 'targets', 'batch'} for time per sample vs groups.
  fig6_kv_bound: {'model_gin', 'inputs', 'targets', 'batch'} ({}: none): Figure 6's groups
    timed again on a model shape with random weights (a model gin file under configs/ with
    the same number of heads), one large enough that reading the key/value cache dominates a
    decode step, as at the paper's scale; the claims' speed measures use it when present.
  decode_partitions: model-parallel size of the evaluate and timing stages' decoding mesh.
  fig6_layouts: {G: (num_partitions, kv_batch_partitioned, global batch)}: how the timing
    stages decode G (e.g. the layout `gqa-plan --table1` found fastest for it); a G not given
    is decoded with decode_partitions, replicated K/V and fig6's batch.
  """
  name: str = gin.REQUIRED
  models: Dict[str, str] = gin.REQUIRED
  pretrain_gin: str = gin.REQUIRED
  pretrain_steps: int = gin.REQUIRED
  uptrain_gin: str = gin.REQUIRED
  finetune_gin: str = gin.REQUIRED
  finetune_steps: int = gin.REQUIRED
  tasks: Dict[str, str] = gin.REQUIRED
  variants: Sequence[Tuple] = gin.REQUIRED
  table_variants: Sequence[Tuple] = gin.REQUIRED
  fig6: Dict[str, object] = gin.REQUIRED
  checkpoints: Dict[str, str] = dataclasses.field(default_factory=dict)
  bindings: Sequence[str] = ()
  prepare: Dict[str, int] = dataclasses.field(default_factory=dict)
  decode_partitions: int = 1
  eval_examples: int = 100
  eval_batch_size: int = 16
  timing_repeats: int = 5
  heldout_task_gin: str = ""
  heldout_examples: int = 0
  heldout_batch_size: int = 8
  calibration_examples: int = 0
  seeds: Sequence[int] = (0,)
  finetune_variants: Sequence[Tuple] = ()
  fig6_kv_bound: Dict[str, object] = dataclasses.field(default_factory=dict)
  fig6_layouts: Dict[int, Tuple[int, bool, int]] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    seeds = tuple(self.seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(
        isinstance(s, int) and s >= 0 for s in seeds):
      raise errors.UserError(f"preset {self.name}: seeds must be distinct non-negative integers, "
                             f"got {list(seeds)}")
    object.__setattr__(self, "seeds", seeds)
    parsed = tuple(Variant(*v) for v in self.variants)
    for v in parsed:
      if v.model not in self.models:
        raise errors.UserError(f"preset {self.name}: variant {v.label} names unknown model "
                               f"{v.model!r}; models are {sorted(self.models)}")
      if v.method not in METHODS:
        raise errors.UserError(f"preset {self.name}: variant {v.key} has method {v.method!r}; "
                               f"use one of {', '.join(METHODS)}")
      if v.alpha < 0:
        raise errors.UserError(f"preset {self.name}: variant {v.key} has negative alpha {v.alpha}")
    if self.calibration_examples and not self.heldout_task_gin:
      raise errors.UserError(f"preset {self.name}: calibration_examples calibrates on "
                             "heldout_task_gin's task; set Preset.heldout_task_gin too")
    finetuned = tuple(Variant(*v) for v in self.finetune_variants) or parsed
    table = tuple(Variant(*v) for v in self.table_variants)
    for field, chosen, among in (("finetune_variants", finetuned, parsed),
                                 ("table_variants", table, finetuned)):
      missing = [v.key for v in chosen if v not in among]
      if missing:
        raise errors.UserError(f"preset {self.name}: {field} {missing} are not "
                               f"{'fine-tuned' if among is finetuned else 'in variants'}")
    object.__setattr__(self, "variants", parsed)
    object.__setattr__(self, "finetune_variants", finetuned)
    object.__setattr__(self, "table_variants", table)

  def uptrain_steps(self, variant: Variant) -> int:
    return round(self.pretrain_steps * variant.alpha)


def preset_file(name_or_path: str) -> str:
  """configs/reproduce/NAME.gin, or a path to a preset gin file."""
  if os.path.isfile(name_or_path):
    return name_or_path
  path = os.path.join(PRESETS_DIR, f"{name_or_path}.gin")
  if not os.path.isfile(path):
    known = sorted(f[:-4] for f in os.listdir(PRESETS_DIR) if f.endswith(".gin"))
    raise errors.UserError(f"unknown preset {name_or_path!r}: choose one of {', '.join(known)} "
                           "or give a preset gin file")
  return path


def load_preset(name_or_path: str, bindings: Sequence[str] = ()) -> Preset:
  """Parses the preset's gin file (and `bindings`) into a Preset."""
  gin.clear_config()
  gin.parse_config_files_and_bindings([preset_file(name_or_path)], bindings)
  return Preset()
