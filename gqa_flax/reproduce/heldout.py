"""Held-out loss stage: every checkpoint's teacher-forced loss on the same held-out examples.

  python -m gqa_flax.reproduce.heldout --output FILE --task_gin GIN --split validation \\
    --num_examples 256 --batch_size 32 [--num_partitions P] --score NAME=CHECKPOINT [...] \\
    [--similarity MODEL=CHECKPOINT ...]

The examples are the split's first `num_examples` (unshuffled, unpacked, the task's own
preprocessing with its fixed seed: span corruption draws the same spans every time), so every
checkpoint is scored on the same examples, in the same order: the claims compare variants
pairwise (`claims.py`). A checkpoint named several times (a deterministic conversion, the
same for every seed) is scored once. Each example's loss is its mean cross entropy per target
token (`training.evaluation.per_example_losses`, as the evaluate stage scores the fine-tuned
models). On a pod every host runs the command with the pod flags and reads the same examples;
each batch is sharded over the data axis and the losses gathered. FILE (written by process
0): {"task", "split", "num_examples", "losses": {NAME: [loss per example]},
"kv_head_similarity": {MODEL: {kernel: mean pairwise cosine of its heads}}} (the multi-head
models the run pre-trained: how alike the heads that conversion pools are; read here, in a
stage, because the runner itself never starts a JAX backend).
"""
import argparse
import sys
from typing import Dict, List

import numpy as np

from gqa_flax import errors, pod
from gqa_flax.checkpoints.convert import kv_head_similarity
from gqa_flax.checkpoints.reader import open_checkpoint
from gqa_flax.storage import write_json
from gqa_flax.training import data_pipeline, evaluation
from gqa_flax.training.partitioning import Partitioner


def heldout_losses(checkpoint: str, cfg: data_pipeline.DatasetConfig, num_examples: int,
                   partitioner: Partitioner) -> np.ndarray:
  """[num_examples] losses of the checkpoint on the first examples of `cfg`'s split."""
  predictor, _ = evaluation.restore_predictor(checkpoint, partitioner=partitioner)
  losses, tokens = evaluation.per_example_losses(predictor, cfg, num_examples)
  if len(losses) < num_examples or not tokens.all():
    raise errors.UserError(f"the {cfg.split} split of {cfg.mixture_or_task_name} has fewer than "
                           f"{num_examples} examples; lower --num_examples")
  return losses


def _named(specs: List[str]) -> Dict[str, str]:
  """{NAME: CHECKPOINT} of NAME=CHECKPOINT flag values."""
  return dict(spec.split("=", 1) for spec in specs)


def parse_args(argv=None) -> argparse.Namespace:
  parser = errors.ArgumentParser(prog="gqa_flax.reproduce.heldout", description=__doc__)
  parser.add_argument("--output", required=True)
  parser.add_argument("--task_gin", required=True, help="sets MIXTURE_OR_TASK_NAME and "
                      "TASK_FEATURE_LENGTHS (e.g. the preset's pre-training gin file)")
  parser.add_argument("--split", default="validation")
  parser.add_argument("--num_examples", type=int, required=True)
  parser.add_argument("--batch_size", type=int, required=True)
  parser.add_argument("--num_partitions", type=int, default=1)
  parser.add_argument("--score", action="append", required=True, metavar="NAME=CHECKPOINT")
  parser.add_argument("--similarity", action="append", default=[], metavar="MODEL=CHECKPOINT",
                      help="a multi-head checkpoint whose key/value heads' similarity to report")
  pod.add_flags(parser)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    pod.initialize(**pod.flags_of(args))
    if args.num_examples < 1 or args.num_examples % args.batch_size:
      raise errors.UserError(f"--num_examples={args.num_examples} must be a positive multiple "
                             f"of --batch_size={args.batch_size}")
    scores = _named(args.score)
    cfg = data_pipeline.from_task_gin(args.task_gin, args.split, args.batch_size)
    partitioner = Partitioner(args.num_partitions)
    by_checkpoint: Dict[str, List[float]] = {}  # a checkpoint named twice is scored once
    losses: Dict[str, List[float]] = {}
    for name, checkpoint in scores.items():
      if checkpoint not in by_checkpoint:
        by_checkpoint[checkpoint] = heldout_losses(checkpoint, cfg, args.num_examples,
                                                   partitioner).tolist()
      losses[name] = by_checkpoint[checkpoint]
      print(f"{name}: held-out loss {np.mean(losses[name]):.4f} on {args.num_examples} "
            f"{cfg.split} examples of {cfg.mixture_or_task_name}", flush=True)
    if pod.is_writer():
      similarity = {model: kv_head_similarity(open_checkpoint(checkpoint))
                    for model, checkpoint in _named(args.similarity).items()}
      write_json(args.output, {"task": cfg.mixture_or_task_name, "split": cfg.split,
                               "num_examples": args.num_examples, "losses": losses,
                               "kv_head_similarity": similarity})
  except errors.UserError as e:
    pod.fail("gqa_flax.reproduce.heldout", errors.one_line(e))
  return 0


if __name__ == "__main__":
  sys.exit(main())
