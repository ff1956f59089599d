"""Evaluation stage: every variant's fine-tuned checkpoints on the test splits, and their
time per sample.

  python -m gqa_flax.reproduce.evaluate --output_dir DIR --num_examples 100 --batch_size 16 \\
    --repeats 5 --eval=VARIANT:TASK_GIN=MODEL_DIR [--eval=...]

Scores come from the project's evaluation entry (`gqa_flax.training.evaluation.evaluate`,
i.e. `gqa-eval` with runs/eval.gin + TASK_GIN on the kept (best) checkpoint of MODEL_DIR):
greedy decoding, seqio postprocessing, the task's metric_fns. A task's score is its first
metric among rouge1 / bleu / f1 (Table 1's R1, BLEU, F1); `test_losses` holds each scored
example's teacher-forced loss (a per-example measure, so it has intervals). The time per
sample is the median over `repeats` of greedy-decoding one batch of test inputs (compilation
excluded) divided by the batch size, averaged over the tasks. Each variant's result is
written to DIR/VARIANT.json as soon as it is complete, and a rerun skips variants already
there.
"""
import collections
import json
import os
import sys
import time
from typing import Dict, List

import gin
import jax
import numpy as np
from etils import epath

from gqa_flax import errors, pod
from gqa_flax.checkpoints.orbax_format import step_dir
from gqa_flax.reproduce.timing import seconds_per_sample
from gqa_flax.storage import write_json
from gqa_flax.training import data_pipeline, evaluation, gin_utils
from gqa_flax.training.partitioning import Partitioner

PRIMARY_METRICS = ("rouge1", "bleu", "f1")


def first_batch(cfg: data_pipeline.DatasetConfig, batch_size: int) -> np.ndarray:
  """Encoder inputs [batch_size, inputs_len] of the split's first examples, zero-padded."""
  lengths = dict(cfg.task_feature_lengths)
  ds = cfg.task().get_dataset(lengths, split=cfg.split, shuffle=False, num_epochs=1)
  tokens = np.zeros((batch_size, lengths["inputs"]), np.int32)
  for row, example in enumerate(ds.take(batch_size).as_numpy_iterator()):
    tokens[row, :len(example["inputs"])] = example["inputs"]
  return tokens


def evaluate_task(task_gin: str, model_dir: str, output_dir: str, num_examples: int,
                  batch_size: int, repeats: int, num_partitions: int) -> dict:
  """gqa-eval of MODEL_DIR's kept checkpoint on TASK_GIN's test split, plus its timing."""
  checkpoint = step_dir(model_dir)
  if checkpoint is None:
    raise errors.MissingPathError(f"no checkpoint in {model_dir}")
  gin.clear_config()
  gin_utils.parse_gin(["runs/eval.gin", task_gin], [
      f'CHECKPOINT_PATH="{checkpoint}"', f'EVAL_OUTPUT_DIR="{output_dir}"',
      f"EVAL_MAX_EXAMPLES={num_examples}", f"BATCH_SIZE={batch_size}",
      f"NUM_PARTITIONS={num_partitions}"])
  metrics = evaluation.evaluate()
  counts = json.loads((epath.Path(output_dir) / evaluation.METRICS_FILE).read_text())[
      "num_examples"]
  (task, scores), = metrics.items()
  metric = next(m for m in PRIMARY_METRICS if m in scores)
  cfg = data_pipeline.DatasetConfig()
  tokens = first_batch(cfg, batch_size)
  decoder, step = evaluation.restore_predictor(checkpoint, partitioner=Partitioner(num_partitions))
  targets = cfg.task_feature_lengths["targets"]
  t_infer = seconds_per_sample(lambda: decoder.predict(tokens, targets), batch_size, repeats)
  losses = evaluation.per_example_losses(decoder, cfg, counts[task])[0].tolist()
  config = decoder.model.config
  if pod.is_writer():
    print(f"{task}: {metric} {scores[metric]:.2f} and loss {np.mean(losses):.4f} on "
          f"{counts[task]} test examples, {t_infer * 1e3:.2f} ms/sample "
          f"({config.attention_name}, step {step})", flush=True)
  return {"task": task, "checkpoint": checkpoint, "metric": metric, "score": float(scores[metric]),
          "metrics": {k: float(v) for k, v in scores.items()}, "n_eval_examples": counts[task],
          "test_losses": losses, "t_infer_s": t_infer, "kv_heads": config.num_kv_heads,
          "num_heads": config.num_heads}


def run_output_dir(output_dir: str, variant: str, model_dir: str) -> str:
  """Where gqa-eval writes one fine-tuned run's metrics and `{task}-predictions.jsonl`."""
  return os.path.join(output_dir, variant, os.path.basename(model_dir))


def evaluate_variant(runs: List[List[str]], output_dir: str, variant: str, num_examples: int,
                     batch_size: int, repeats: int, num_partitions: int) -> dict:
  tasks = [evaluate_task(task_gin, model_dir, run_output_dir(output_dir, variant, model_dir),
                         num_examples, batch_size, repeats, num_partitions)
           for task_gin, model_dir in runs]
  return {"tasks": {t["task"]: t for t in tasks},
          "t_infer_s": float(np.mean([t["t_infer_s"] for t in tasks])),
          "device": jax.devices()[0].device_kind}


def parse_evals(evals: List[str]) -> Dict[str, List[List[str]]]:
  """['VARIANT:TASK_GIN=MODEL_DIR', ...] -> {variant: [[task_gin, model_dir], ...]}."""
  grouped = collections.OrderedDict()
  for spec in evals:
    variant, _, run = spec.partition(":")
    task_gin, _, model_dir = run.partition("=")
    if not (variant and task_gin and model_dir):
      raise errors.UserError(f"--eval takes VARIANT:TASK_GIN=MODEL_DIR, got {spec!r}")
    grouped.setdefault(variant, []).append([task_gin, model_dir])
  return grouped


def main(argv=None) -> int:
  parser = errors.ArgumentParser(prog="gqa_flax.reproduce.evaluate",
                                   description=__doc__.split("\n")[0])
  parser.add_argument("--eval", action="append", required=True,
                      metavar="VARIANT:TASK_GIN=MODEL_DIR", help="repeatable")
  parser.add_argument("--num_examples", type=int, default=100, help="test examples per task")
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5, help="timed decoding repeats")
  parser.add_argument("--num_partitions", type=int, default=1,
                      help="model-parallel size of the decoding mesh")
  parser.add_argument("--output_dir", required=True)
  pod.add_flags(parser)
  args = parser.parse_args(argv)
  start = time.time()
  results = {}
  try:
    pod.initialize(**pod.flags_of(args))
    for variant, runs in parse_evals(args.eval).items():
      path = epath.Path(args.output_dir) / f"{variant}.json"
      # Every host decodes the same variants: the writer's view of what is done decides.
      if not pod.broadcast(f"evaluate/{variant}/done", path.is_file()):
        result = evaluate_variant(runs, args.output_dir, variant, args.num_examples,
                                  args.batch_size, args.repeats, args.num_partitions)
        if pod.is_writer():
          write_json(str(path), result)
        pod.barrier(f"evaluate/{variant}/written")
      results[variant] = json.loads(path.read_text())
  except (ValueError, OSError) as e:
    print(f"gqa_flax.reproduce.evaluate: error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  if pod.is_writer():
    write_json(os.path.join(args.output_dir, "result.json"), {
        "variants": results, "batch_size": args.batch_size, "repeats": args.repeats,
        "max_examples": args.num_examples, "num_partitions": args.num_partitions,
        "seconds": round(time.time() - start, 1)})
  return 0


if __name__ == "__main__":
  sys.exit(main())
