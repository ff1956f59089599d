"""Training entry point: `python -m gqa_flax.train` / `gqa-train` with T5X's flags.

  gqa-train --gin_file=models/t5_1_1/tiny.gin --gin_file=experiments/tasks/cnn_dailymail.gin \\
    --gin_file=runs/finetune.gin --gin.MODEL_DIR=\"'/tmp/run'\" --gin.TRAIN_STEPS=1001000 \\
    --gin.INITIAL_CHECKPOINT_PATH=\"'/ckpt/converted'\"

Gin files: a model (models/t5_1_1/*.gin, attention/*.gin), a task (experiments/tasks/*.gin, or
MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS) and a run (runs/pretrain.gin, uptrain.gin,
finetune.gin), in any order; or one experiments/*.gin that includes them. Needs MODEL_DIR,
TRAIN_STEPS and, to uptrain or fine-tune, INITIAL_CHECKPOINT_PATH (a checkpoint_<step>
directory or a run directory: its latest step). Resumes from MODEL_DIR's latest checkpoint.

From Python: parse gin (gin_utils.parse_gin) and call `gqa_flax.train.train()`; it returns a
summary dict (final step, loss, params, ...).
"""
import logging

from gqa_flax.training import gin_utils
from gqa_flax.training.loop import train

__all__ = ["train", "main", "console"]


def main() -> None:
  summary = train()
  logging.info("finished at step %d (loss %s)", summary["step"], summary.get("loss"))


def console() -> None:
  """`gqa-train` console script."""
  gin_utils.run(main, "gqa-train", __doc__, configurable=train)


if __name__ == "__main__":
  console()
