"""Inference (T5X's infer.py): decode a task split, or a text file of inputs, to a jsonl file.

The inputs are tokenized with the task's vocabulary and cut to TASK_FEATURE_LENGTHS['inputs']
(EOS kept); decoding is greedy (the paper's inference) or beam search with `beam_size` > 1
and length penalty `alpha` (`gqa_flax.decoding.beam_search`, best beam), up to
TASK_FEATURE_LENGTHS['targets'] tokens, by a `predictor.Predictor` partitioned over the mesh.
`infer` writes OUTPUT_DIR/predictions.jsonl, one line per input in order: {'inputs',
'prediction'} and, for a task split, the reference 'targets' (on a pod: written by one host).
"""
import functools
import json
import logging
from typing import Optional

import gin
import seqio
import tensorflow as tf
from etils import epath

from gqa_flax import errors, pod
from gqa_flax.training.data_pipeline import DatasetConfig
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.evaluation import check_checkpoint_path, predict_dataset, restore_predictor
from gqa_flax.training.partitioning import Partitioner

PREDICTIONS_FILE = "predictions.jsonl"


def _file_dataset(task: seqio.Task, inputs_file: str, lengths: dict) -> tf.data.Dataset:
  """The non-empty lines of `inputs_file` as tokenized task examples (empty targets)."""
  if not epath.Path(inputs_file).is_file():
    raise errors.MissingPathError(f"INFER_INPUTS_FILE {inputs_file} does not exist")
  lines = [line for line in epath.Path(inputs_file).read_text().splitlines() if line.strip()]
  if not lines:
    raise errors.UserError(f"INFER_INPUTS_FILE {inputs_file} has no non-empty line")
  ds = tf.data.Dataset.from_tensor_slices({"inputs": lines, "targets": [""] * len(lines)})
  ds = seqio.preprocessors.tokenize(ds, task.output_features)
  return seqio.preprocessors.append_eos_after_trim(ds, task.output_features, lengths)


def _text(value: bytes) -> str:
  return value.decode("utf-8", "replace")


@gin.configurable
def infer(*, dataset_cfg: DatasetConfig, checkpoint_path: str, output_dir: str,
          num_examples: Optional[int] = None, inputs_file: Optional[str] = None,
          beam_size: int = 1, alpha: float = 0.6,
          model: Optional[EncoderDecoderModel] = None,
          partitioner: Optional[Partitioner] = None, dtype: Optional[str] = None) -> str:
  """Decodes the first `num_examples` (None: all) inputs of `dataset_cfg`'s split, or of
  `inputs_file` (one input per line), with the checkpoint; returns the predictions file."""
  check_checkpoint_path(checkpoint_path)
  if not output_dir:
    raise errors.UserError("INFER_OUTPUT_DIR is not set; pass --gin.INFER_OUTPUT_DIR=\"/path\"")
  if beam_size < 1 or (num_examples is not None and num_examples < 1):
    raise errors.UserError(
        f"beam_size={beam_size}, num_examples={num_examples}: use positive numbers")
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
  predictor, step = restore_predictor(checkpoint_path, model, partitioner, dtype)
  predict_batch = functools.partial(predictor.predict, max_decode_length=lengths["targets"],
                                    beam_size=beam_size, alpha=alpha)
  model_ds = seqio.EncDecFeatureConverter(pack=False)(ds, lengths).enumerate()
  tokens = [t for _, t in sorted(predict_dataset(predict_batch, model_ds, dataset_cfg.batch_size))]
  path = epath.Path(output_dir) / PREDICTIONS_FILE
  if pod.is_writer():
    _write_predictions(path, ds, tokens, task.output_features["targets"].vocabulary,
                       with_targets=not inputs_file)
    (path.parent / "config.gin").write_text(gin.config_str())
  logging.info("wrote %d predictions of step %s to %s", len(tokens), step, path)
  return str(path)


def _write_predictions(path: epath.Path, ds: tf.data.Dataset, tokens, vocabulary,
                       with_targets: bool) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("w") as f:
    for example, prediction in zip(ds.as_numpy_iterator(), tokens):
      record = {"inputs": _text(example["inputs_pretokenized"]),
                "prediction": vocabulary.decode(prediction)}
      if with_targets:
        record["targets"] = _text(example["targets_pretokenized"])
      f.write(json.dumps(record) + "\n")
