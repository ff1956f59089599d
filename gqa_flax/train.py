"""Training entry point: `python -m gqa_flax.train` / `gqa-train` with T5X's flags.

  gqa-train --gin_file=models/t5_1_1/tiny.gin --gin_file=runs/pretrain.gin \\
    --gin.MODEL_DIR=\"/tmp/run\" --gin.TRAIN_STEPS=100 --gin.MIXTURE_OR_TASK_NAME=\"task\" ...

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
  gin_utils.run(main)


if __name__ == "__main__":
  console()
