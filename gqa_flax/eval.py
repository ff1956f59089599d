"""Evaluation entry point: `python -m gqa_flax.eval` / `gqa-eval` (T5X's eval.py).

Scores one checkpoint on a task split with the task's metrics (greedy decoding, max decode
length = the targets length, seqio postprocessing and metric_fns):

  gqa-eval --gin_file=runs/eval.gin --gin_file=experiments/tasks/cnn_dailymail.gin \\
    --gin.CHECKPOINT_PATH=\"'/runs/ft/checkpoint_1050000'\" \\
    --gin.EVAL_OUTPUT_DIR=\"'/runs/ft/eval'\" --gin.EVAL_SPLIT=\"'test'\" \\
    --gin.EVAL_MAX_EXAMPLES=100

CHECKPOINT_PATH is any checkpoint `gqa_flax.checkpoints.load` reads (our Orbax layout, T5X
legacy, HF T5 v1.1). The network is the checkpoint's own config; a T5X legacy checkpoint stores
none, so its config is inferred from its shapes unless a model gin file is added with
`--gin.evaluate.model=%MODEL`. Writes EVAL_OUTPUT_DIR/metrics.json ({'checkpoint_path', 'step',
'split', 'num_examples': {task: n}, 'metrics': {task: {metric: value}}}),
EVAL_OUTPUT_DIR/{task}-predictions.jsonl and config.gin, and prints one line per task.

Needs CHECKPOINT_PATH, EVAL_OUTPUT_DIR and a task (a task gin file, or MIXTURE_OR_TASK_NAME and
TASK_FEATURE_LENGTHS); --gin.NAME=VALUE strings need quotes: --gin.EVAL_OUTPUT_DIR=\"'/tmp/out'\".

From Python: parse gin (gin_utils.parse_gin) and call `gqa_flax.eval.evaluate()` (or pass every
argument); it returns {task: {metric: value}}.
"""
from gqa_flax.training import gin_utils
from gqa_flax.training.evaluation import evaluate

__all__ = ["evaluate", "main", "console"]


def main() -> None:
  for task, metrics in evaluate().items():
    print(f"{task}: " + ", ".join(f"{name}={value:.4f}" for name, value in sorted(metrics.items())),
          flush=True)


def console() -> None:
  """`gqa-eval` console script."""
  gin_utils.run(main, "gqa-eval", __doc__, configurable=evaluate)


if __name__ == "__main__":
  console()
