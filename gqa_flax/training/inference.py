"""Inference (T5X's infer.py): decode a task split, or a text file of inputs, to a jsonl file.

The inputs are tokenized with the task's vocabulary and cut to TASK_FEATURE_LENGTHS['inputs']
(EOS kept); decoding is greedy (`EncoderDecoderModel.predict_batch`, the paper's inference) or
beam search with `beam_size` > 1 and length penalty `alpha` (`gqa_flax.decoding.beam_search`,
best beam), up to TASK_FEATURE_LENGTHS['targets'] tokens. `infer` writes
OUTPUT_DIR/predictions.jsonl, one line per input in order: {'inputs', 'prediction'} and, for a
task split, the reference 'targets'.
"""
import json
import logging
import os
from typing import Any, Optional

import gin
import seqio
import tensorflow as tf

from gqa_flax import decoding
from gqa_flax.training.data_pipeline import DatasetConfig
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.evaluation import (PredictBatchFn, check_checkpoint_path,
                                          greedy_predict_fn, predict_dataset, restore_model)

PREDICTIONS_FILE = "predictions.jsonl"


def _file_dataset(task: seqio.Task, inputs_file: str, lengths: dict) -> tf.data.Dataset:
  """The non-empty lines of `inputs_file` as tokenized task examples (empty targets)."""
  if not os.path.isfile(inputs_file):
    raise FileNotFoundError(f"INFER_INPUTS_FILE {inputs_file} does not exist")
  with open(inputs_file) as f:
    lines = [line.rstrip("\n") for line in f if line.strip()]
  if not lines:
    raise ValueError(f"INFER_INPUTS_FILE {inputs_file} has no non-empty line")
  ds = tf.data.Dataset.from_tensor_slices({"inputs": lines, "targets": [""] * len(lines)})
  ds = seqio.preprocessors.tokenize(ds, task.output_features)
  return seqio.preprocessors.append_eos_after_trim(ds, task.output_features, lengths)


def beam_predict_fn(model: EncoderDecoderModel, params: Any, max_decode_length: int,
                    beam_size: int, alpha: float) -> PredictBatchFn:
  """Best beam's tokens [batch, max_decode_length]."""
  def predict(inputs):
    tokens, _ = decoding.beam_search(model.module, params, inputs, max_decode_length, beam_size,
                                     alpha)
    return tokens[:, 0]
  return predict


def _text(value: bytes) -> str:
  return value.decode("utf-8", "replace")


@gin.configurable
def infer(*, dataset_cfg: DatasetConfig, checkpoint_path: str, output_dir: str,
          num_examples: Optional[int] = None, inputs_file: Optional[str] = None,
          beam_size: int = 1, alpha: float = 0.6,
          model: Optional[EncoderDecoderModel] = None) -> str:
  """Decodes the first `num_examples` (None: all) inputs of `dataset_cfg`'s split, or of
  `inputs_file` (one input per line), with the checkpoint; returns the predictions file."""
  check_checkpoint_path(checkpoint_path)
  if not output_dir:
    raise ValueError("INFER_OUTPUT_DIR is not set; pass --gin.INFER_OUTPUT_DIR=\"/path\"")
  if beam_size < 1 or (num_examples is not None and num_examples < 1):
    raise ValueError(f"beam_size={beam_size}, num_examples={num_examples}: use positive numbers")
  task = dataset_cfg.task()
  lengths = dict(dataset_cfg.task_feature_lengths)
  if inputs_file:
    ds = _file_dataset(task, inputs_file, lengths)
  else:
    ds = task.get_dataset(lengths, split=dataset_cfg.split, shuffle=False, num_epochs=1,
                          seed=dataset_cfg.seed, use_cached=dataset_cfg.use_cached)
  if num_examples is not None:
    ds = ds.take(num_examples)
  ds = ds.cache()
  model, params, step = restore_model(checkpoint_path, model)
  max_decode_length = lengths["targets"]
  predict_batch = (greedy_predict_fn(model, params, max_decode_length) if beam_size == 1 else
                   beam_predict_fn(model, params, max_decode_length, beam_size, alpha))
  model_ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths).enumerate()
  tokens = [t for _, t in sorted(predict_dataset(predict_batch, model_ds, dataset_cfg.batch_size))]
  vocabulary = task.output_features["targets"].vocabulary
  os.makedirs(output_dir, exist_ok=True)
  path = os.path.join(output_dir, PREDICTIONS_FILE)
  with open(path, "w") as f:
    for example, prediction in zip(ds.as_numpy_iterator(), tokens):
      record = {"inputs": _text(example["inputs_pretokenized"]),
                "prediction": vocabulary.decode(prediction)}
      if not inputs_file:
        record["targets"] = _text(example["targets_pretokenized"])
      f.write(json.dumps(record) + "\n")
  with open(os.path.join(output_dir, "config.gin"), "w") as f:
    f.write(gin.config_str())
  logging.info("wrote %d predictions of step %s to %s", len(tokens), step, path)
  return path
