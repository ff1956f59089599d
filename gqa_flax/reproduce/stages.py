"""The stage plan of a preset: every stage is one command of the project's own CLIs.

  prepare                        python -m gqa_flax.data.prepare --mini   (mini corpora only)
  pretrain-MODEL                 python -m gqa_flax.train  (models without a checkpoint)
  convert-MODEL-ATTN-METHOD      python -m gqa_flax.convert (`random`: one per seed, -sSEED)
  uptrain-MODEL-ATTN-METHOD-sSEED  python -m gqa_flax.train  (runs/uptrain.gin; one run per
                                 conversion and seed, saving at every variant's alpha > 0)
  heldout                        python -m gqa_flax.reproduce.heldout (every variant's held-out
                                 loss after conversion and uptraining; the claims' measure)
  finetune-VARIANT-sSEED-TASK    python -m gqa_flax.train  (runs/finetune.gin + task gin; the
                                 preset's finetune_variants)
  evaluate                       python -m gqa_flax.reproduce.evaluate (gqa-eval's evaluate() on
                                 every variant's test splits, and decode timing)
  fig6-timing                    python -m gqa_flax.reproduce.timing
  fig6-timing-kv-bound           python -m gqa_flax.reproduce.timing --model_gin (Figure 6 at a
                                 shape where the key/value cache dominates; random weights)

Pre-training is not repeated per seed (the paper starts from one public checkpoint); every run
after it takes the seed (`Preset.seeds`): `--gin.RANDOM_SEED` (data order, dropout) and the
`random` conversion's `--seed`. Mean and first pooling are deterministic: one conversion
serves every seed. A conversion is uptrained once per seed, up to the largest alpha of its
variants, saving a checkpoint at every variant's alpha (one process, one compilation; alpha
0.05 is the first 5% of the alpha 0.1 run, as the paper's continued pre-training is).
"""
import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence

from gqa_flax import compilation_cache
from gqa_flax.reproduce.presets import Preset, Variant


@dataclasses.dataclass(frozen=True)
class Stage:
  """One command. On a pod every host runs it (joined by the pod flags the runner appends),
  except a `writer_only` stage (the mini corpus' preparation), which process 0 runs alone."""
  name: str
  argv: Sequence[str]
  result: Optional[str] = None  # the JSON file the command writes (kept in DONE.json)
  writer_only: bool = False


def _module(name: str, *args: str) -> List[str]:
  return [sys.executable, "-m", name, *args]


def _absolute(path: str) -> str:
  """A local path made absolute; a URL (gs://...) as it is."""
  return path if "://" in path else os.path.abspath(path)


def seeded(v: Variant, seed: int) -> str:
  """The id of a variant's runs with one seed, e.g. 'mini-mqa-a0.05-mean-s1'."""
  return f"{v.key}-s{seed}"


class Plan:
  """Paths and commands of a preset's run under `out`."""

  def __init__(self, preset: Preset, out: str, data_dir: Optional[str],
               tfds_data_dir: Optional[str] = None):
    self.preset = preset
    self.out = _absolute(out)
    self.data_dir = _absolute(data_dir) if data_dir else None
    self.tfds_data_dir = tfds_data_dir or os.environ.get("TFDS_DATA_DIR")

  def run_dir(self, name: str) -> str:
    return os.path.join(self.out, "runs", name)

  def stage_dir(self, name: str) -> str:
    return os.path.join(self.out, "stages", name)

  def _step_dir(self, run: str, step: int) -> str:
    return os.path.join(self.run_dir(run), f"checkpoint_{step}")

  def pretrains(self) -> List[str]:
    """The models this run pre-trains itself (those the preset gives no checkpoint of)."""
    return sorted({v.model for v in self.preset.variants} - set(self.preset.checkpoints))

  def pretrained(self, model: str) -> str:
    return self.preset.checkpoints.get(model) or self._step_dir(
        f"pretrain-{model}", self.preset.pretrain_steps)

  def _convert_run(self, v: Variant, seed: int) -> str:
    run = f"convert-{v.model}-{v.attention_id}-{v.method}".lower()
    return f"{run}-s{seed}" if v.method == "random" else run

  def _calibration(self, v: Variant) -> List[str]:
    """gqa-convert's calibration flags of an `aligned` conversion (none: kernels alone)."""
    p = self.preset
    if v.method != "aligned" or not p.calibration_examples:
      return []
    return [f"--calibration_task_gin={p.heldout_task_gin}",
            f"--calibration_examples={p.calibration_examples}",
            f"--calibration_batch_size={p.heldout_batch_size}"]

  def _uptrain_run(self, v: Variant, seed: int) -> str:
    return f"uptrain-{v.model}-{v.attention_id}-{v.method}-s{seed}".lower()

  def start_step(self, v: Variant) -> int:
    return self.preset.pretrain_steps + (0 if v.kv_heads is None else self.preset.uptrain_steps(v))

  def start_checkpoint(self, v: Variant, seed: int) -> str:
    """Where fine-tuning starts: pre-trained (MHA), converted (alpha 0) or uptrained."""
    if v.kv_heads is None:
      return self.pretrained(v.model)
    if self.preset.uptrain_steps(v) == 0:
      return self._step_dir(self._convert_run(v, seed), self.preset.pretrain_steps)
    return self._step_dir(self._uptrain_run(v, seed), self.start_step(v))

  def finetune_run(self, v: Variant, seed: int, task: str) -> str:
    return f"finetune-{seeded(v, seed)}-{task}"

  def _train(self, v: Variant, run_gin: str, run: str, steps: int, initial: Optional[str],
             task_gin: Optional[str] = None, seed: Optional[int] = None) -> List[str]:
    argv = _module("gqa_flax.train", f"--gin_file={self.preset.models[v.model]}",
                   f"--gin_file={run_gin}")
    if task_gin:
      argv.append(f"--gin_file={task_gin}")
    argv += [f'--gin.MODEL_DIR="{self.run_dir(run)}"', f"--gin.TRAIN_STEPS={steps}"]
    if self.tfds_data_dir:
      argv.append(f"--tfds_data_dir={self.tfds_data_dir}")
    if initial:
      argv.append(f'--gin.INITIAL_CHECKPOINT_PATH="{initial}"')
    if seed is not None:
      argv.append(f"--gin.RANDOM_SEED={seed}")
    if v.kv_heads is not None:
      argv.append(f"--gin_bindings=t5_1_1_config.num_kv_heads={v.kv_heads}")
    return argv + [f"--gin_bindings={b}" for b in self.preset.bindings]

  def stages(self) -> List[Stage]:
    p = self.preset
    stages: Dict[str, Stage] = {}

    def add(stage: Stage) -> None:
      stages.setdefault(stage.name, stage)

    if p.prepare:
      add(Stage("prepare", _module("gqa_flax.data.prepare", "--mini", f"--data_dir={self.data_dir}",
                                   *(f"--{k}={val}" for k, val in sorted(p.prepare.items()))),
                writer_only=True))
    for model in self.pretrains():
      mha = Variant(model, None, 0.0, "mean")
      add(Stage(f"pretrain-{model}", self._train(mha, p.pretrain_gin, f"pretrain-{model}",
                                                 p.pretrain_steps, None)))
    for seed in p.seeds:
      for v in p.variants:
        if v.kv_heads is None:
          continue
        convert = self._convert_run(v, seed)
        add(Stage(convert, _module(
            "gqa_flax.convert", f"--src={self.pretrained(v.model)}",
            f"--dst={self.run_dir(convert)}", f"--num_kv_heads={v.kv_heads}",
            f"--method={v.method}", *([f"--seed={seed}"] if v.method == "random" else []),
            *self._calibration(v), "--overwrite")))
        uptrain = self._uptrain_run(v, seed)
        if p.uptrain_steps(v) and uptrain not in stages:
          add(self._uptrain_stage(v, seed, self._step_dir(convert, p.pretrain_steps)))
    if p.heldout_examples:
      add(self._heldout_stage())
    for seed in p.seeds:
      for v in p.finetune_variants:
        for task, task_gin in p.tasks.items():
          run = self.finetune_run(v, seed, task)
          add(Stage(run, self._train(v, p.finetune_gin, run, self.start_step(v) + p.finetune_steps,
                                     self.start_checkpoint(v, seed), task_gin, seed)))
    evaluate = self.stage_dir("evaluate")
    add(Stage("evaluate", _module(
        "gqa_flax.reproduce.evaluate", f"--output_dir={evaluate}",
        f"--num_examples={p.eval_examples}", f"--batch_size={p.eval_batch_size}",
        f"--repeats={p.timing_repeats}", f"--num_partitions={p.decode_partitions}",
        *(f"--eval={seeded(v, s)}:{task_gin}={self.run_dir(self.finetune_run(v, s, task))}"
          for s in p.seeds for v in p.finetune_variants
          for task, task_gin in p.tasks.items())),
        os.path.join(evaluate, "result.json")))
    add(self._timing_stage("fig6-timing", f"--checkpoint={self.pretrained(p.fig6['model'])}",
                           p.fig6))
    if p.fig6_kv_bound:
      add(self._timing_stage("fig6-timing-kv-bound",
                             f"--model_gin={p.fig6_kv_bound['model_gin']}", p.fig6_kv_bound))
    return list(stages.values())

  def _timing_stage(self, name: str, source: str, shape: Dict) -> Stage:
    """Figure 6's groups timed on `source` (the timing module's --checkpoint or --model_gin)
    at `shape`'s inputs, targets and batch."""
    p = self.preset
    result = os.path.join(self.stage_dir(name), "result.json")
    return Stage(name, _module(
        "gqa_flax.reproduce.timing", source,
        f"--groups={','.join(str(g) for g in p.fig6['groups'])}", f"--inputs={shape['inputs']}",
        f"--targets={shape['targets']}", f"--batch_size={shape['batch']}",
        f"--repeats={p.timing_repeats}", f"--num_partitions={p.decode_partitions}",
        *(f"--layout={g}={partitions}:{'split' if split else ''}:{batch}"
          for g, (partitions, split, batch) in sorted(p.fig6_layouts.items())),
        f"--output={result}"), result)

  def _uptrain_stage(self, v: Variant, seed: int, converted: str) -> Stage:
    """One run per conversion and seed up to its largest alpha, saving at every alpha's step
    (the checkpoints its variants fine-tune from)."""
    run = self._uptrain_run(v, seed)
    ends = sorted({self.start_step(w) for w in self.preset.variants
                   if w.kv_heads is not None and self.preset.uptrain_steps(w)
                   and self._uptrain_run(w, seed) == run})
    return Stage(run, self._train(v, self.preset.uptrain_gin, run, ends[-1], converted,
                                  seed=seed) + [f"--gin.SaveCheckpointConfig.steps={ends}"])

  def heldout_variants(self) -> List[Variant]:
    """Every variant, and every converted variant right after conversion (alpha 0)."""
    scored: Dict[str, Variant] = {}
    for v in self.preset.variants:
      for w in [v] if v.kv_heads is None else [Variant(v.model, v.kv_heads, 0.0, v.method), v]:
        scored.setdefault(w.key, w)
    return list(scored.values())

  def heldout_checkpoints(self) -> Dict[str, str]:
    """{'heldout/<variant key>/s<seed>': checkpoint} of every held-out variant and seed, as
    fine-tuning starts from it (a deterministic one is the same checkpoint for every seed)."""
    return {f"heldout/{v.key}/s{seed}": self.start_checkpoint(v, seed)
            for v in self.heldout_variants() for seed in self.preset.seeds}

  def _heldout_stage(self) -> Stage:
    p = self.preset
    result = os.path.join(self.stage_dir("heldout"), "result.json")
    return Stage("heldout", _module(
        "gqa_flax.reproduce.heldout", f"--output={result}", f"--task_gin={p.heldout_task_gin}",
        f"--num_examples={p.heldout_examples}", f"--batch_size={p.heldout_batch_size}",
        f"--num_partitions={p.decode_partitions}",
        *(f"--score={name}={checkpoint}"
          for name, checkpoint in self.heldout_checkpoints().items()),
        *(f"--similarity={model}={self.pretrained(model)}" for model in self.pretrains())),
        result)

  def env(self) -> Dict[str, str]:
    """The stages' environment: the mini corpus' data dir when this run prepares one, the
    TFDS data dir of the paper's tasks, and JAX's compilation cache (unless set already):
    stages of one shape (every uptraining run of a variant) compile once."""
    env = {**compilation_cache.environment(), **os.environ}
    if self.data_dir:
      env["GQA_DATA_DIR"] = self.data_dir
    if self.tfds_data_dir:
      env["TFDS_DATA_DIR"] = self.tfds_data_dir
    return env
