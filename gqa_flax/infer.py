"""Inference entry point: `python -m gqa_flax.infer` / `gqa-infer` (T5X's infer.py).

  gqa-infer --gin_file=runs/infer.gin --gin_file=experiments/tasks/cnn_dailymail.gin \\
    --gin.CHECKPOINT_PATH=\"'/runs/ft/checkpoint_1050000'\" \\
    --gin.INFER_OUTPUT_DIR=\"'/runs/ft/infer'\" \\
    [--gin.INFER_SPLIT=\"'validation'\"] [--gin.INFER_MAX_EXAMPLES=10] \\
    [--gin.INFER_INPUTS_FILE=\"'/inputs.txt'\"] [--gin.infer.beam_size=4 --gin.infer.alpha=0.6]

Restores like gqa-eval (any checkpoint format, the checkpoint's config), decodes greedily (or
with beam search) and writes INFER_OUTPUT_DIR/predictions.jsonl: {'inputs', 'prediction'} per
input, plus 'targets' for a task split. INFER_INPUTS_FILE holds one input text per line,
tokenized with the task's vocabulary.

Needs CHECKPOINT_PATH, INFER_OUTPUT_DIR and a task (a task gin file, or MIXTURE_OR_TASK_NAME and
TASK_FEATURE_LENGTHS); --gin.NAME=VALUE strings need quotes: --gin.INFER_OUTPUT_DIR=\"'/tmp/out'\".

From Python: parse gin and call `gqa_flax.infer.infer()`; it returns the predictions file.
"""
from gqa_flax.training import gin_utils
from gqa_flax.training.inference import infer

__all__ = ["infer", "main", "console"]


def main() -> None:
  print(f"predictions: {infer()}", flush=True)


def console() -> None:
  """`gqa-infer` console script."""
  gin_utils.run(main, "gqa-infer", __doc__, configurable=infer)


if __name__ == "__main__":
  console()
