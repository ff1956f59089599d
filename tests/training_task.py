"""A small seqio task on real text for the training tests: reconstruct a line of the GQA paper.

`paper_lines_copy`: inputs and targets are the same line of /work/shared/paper (or the copy the
tests name in $GQA_PAPER_TEXT), byte vocabulary; validation is every 10th line;
scored with ROUGE and BLEU (gqa_flax.evaluation.metrics).
"""
import functools
import os

import seqio
import tensorflow as tf

from gqa_flax.evaluation import metrics

PAPER_TEXT = os.environ.get("GQA_PAPER_TEXT", "/work/shared/paper/gqa_ainslie2023.txt")
TASK_NAME = "paper_lines_copy"
VOCAB_SIZE = 384  # ByteVocabulary's 259 ids rounded up to a multiple of 128


def _lines(split: str, shuffle_files: bool, seed=None) -> tf.data.Dataset:
  del shuffle_files, seed
  with open(PAPER_TEXT) as f:
    lines = [line.strip() for line in f if len(line.strip()) > 20]
  lines = [line for i, line in enumerate(lines) if (i % 10 == 0) == (split == "validation")]
  return tf.data.Dataset.from_tensor_slices({"inputs": lines, "targets": lines})


if TASK_NAME not in seqio.TaskRegistry.names():
  vocabulary = seqio.ByteVocabulary()
  seqio.TaskRegistry.add(
      TASK_NAME,
      source=seqio.FunctionDataSource(_lines, splits=("train", "validation")),
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
      output_features={name: seqio.Feature(vocabulary) for name in ("inputs", "targets")},
      metric_fns=[metrics.rouge, metrics.bleu])
