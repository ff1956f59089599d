"""Inference evaluation (T5X's `infer_eval`): decode a seqio task split, score it with seqio.

`InferenceEvaluator` wraps `seqio.Evaluator`: the split's first `num_examples` examples (in
file order, no shuffling) are cut to the DatasetConfig's task_feature_lengths, decoded
greedily by a `predictor.Predictor` (partitioned over the mesh, max decode length = the
targets length) and scored by the task's metric_fns after its postprocess_fn, exactly as
seqio scores them.

  evaluator = InferenceEvaluator(dataset_cfg, num_examples=100)
  metrics = evaluator.evaluate(predictor)  # {task: {metric: value}}

On a pod every host reads the split and takes part in decoding each batch (its devices decode
their rows), every host gets all predictions back and scores them, and only the writer
writes the predictions and metrics files.

`evaluate` (gin-configurable, behind `gqa_flax.eval`) scores one checkpoint this way and writes
OUTPUT_DIR/metrics.json and {task}-predictions.jsonl; the training loop scores every
checkpoint it saves to keep the best by a task metric (`inference_eval/{task}/{metric}`, T5X's
names).
"""
import functools
import json
import logging
import os
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import gin
import numpy as np
import seqio
import tensorflow as tf
from etils import epath

from gqa_flax import errors, pod
from gqa_flax.training.data_pipeline import DatasetConfig
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner
from gqa_flax.training.predictor import Predictor

PredictBatchFn = Callable[[np.ndarray], np.ndarray]
TaskMetrics = Dict[str, Dict[str, float]]
_LOG_EVERY_BATCHES = 10


def predict_dataset(predict_batch: PredictBatchFn, ds: tf.data.Dataset, batch_size: int
                    ) -> List[Tuple[int, List[int]]]:
  """[(index, tokens)] for an enumerated dataset of (index, {'encoder_input_tokens': [len]}).

  `predict_batch` maps int32 [batch_size, inputs_len] to tokens [batch_size, decode_len]; the
  last batch is padded with zero rows so that it compiles once.
  """
  results: List[Tuple[int, List[int]]] = []
  for i, (indices, features) in enumerate(ds.batch(batch_size).as_numpy_iterator()):
    inputs = features["encoder_input_tokens"].astype(np.int32)
    padded = np.pad(inputs, ((0, batch_size - len(indices)), (0, 0)))
    tokens = np.asarray(predict_batch(padded))[:len(indices)]
    results.extend(zip(indices.tolist(), tokens.tolist()))
    if (i + 1) % _LOG_EVERY_BATCHES == 0:
      logging.info("decoded %d examples", len(results))
  return results


def first_examples(cfg: DatasetConfig, num_examples: int
                   ) -> Iterator[Tuple[Dict[str, np.ndarray], int]]:
  """(batch, rows) over the first n <= `num_examples` examples of `cfg`'s split, in file
  order, unpacked, with the split's own preprocessing seed (the examples the evaluator
  decodes; the same on every host of a pod), in batches of `cfg.batch_size`: the last one
  padded with empty rows after its `rows`, so that it compiles once."""
  lengths = dict(cfg.task_feature_lengths)
  ds = cfg.task().get_dataset(lengths, split=cfg.split, shuffle=False, num_epochs=1,
                              seed=cfg.seed, use_cached=cfg.use_cached)
  ds = seqio.EncDecFeatureConverter(pack=False)(ds.take(num_examples), lengths)
  for batch in ds.batch(cfg.batch_size).as_numpy_iterator():
    rows = len(batch["decoder_target_tokens"])
    yield {name: np.pad(value, ((0, cfg.batch_size - rows), (0, 0)))
           for name, value in batch.items()}, rows


def per_example_losses(predictor: Predictor, cfg: DatasetConfig, num_examples: int
                       ) -> Tuple[np.ndarray, np.ndarray]:
  """([n] teacher-forced loss, [n] target tokens) of each of `first_examples`."""
  losses, tokens = [], []
  for batch, rows in first_examples(cfg, num_examples):
    loss, count = predictor.per_example_loss(batch)
    losses.append(loss[:rows])
    tokens.append(count[:rows])
  if not losses:
    return np.zeros(0, np.float32), np.zeros(0, np.float32)
  return np.concatenate(losses), np.concatenate(tokens)


def predictions_file(output_dir: str, task: str) -> str:
  """Where gqa-eval (PredictionsLogger) writes a task's scored examples."""
  return os.path.join(output_dir, f"{task}-predictions.jsonl")


class PredictionsLogger(seqio.Logger):
  """seqio logger writing `output_dir/{task}-predictions.jsonl`: one line per example with its
  'inputs' text, postprocessed 'targets' and 'prediction'."""

  def __call__(self, task_name, step, metrics, dataset, inferences, targets) -> None:
    del step, metrics
    path = epath.Path(predictions_file(self.output_dir, task_name))
    examples = dataset.as_numpy_iterator()
    with path.open("w") as f:
      for example, target, prediction in zip(examples, targets, inferences["prediction"]):
        f.write(json.dumps({"inputs": _text(example.get("inputs_pretokenized", b"")),
                            "targets": _jsonable(target), "prediction": _jsonable(prediction)})
                + "\n")
    logging.info("wrote %s", path)


def _text(value: Any) -> str:
  return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _jsonable(value: Any) -> Any:
  """Postprocessed targets/predictions: text, numbers or lists of them."""
  if isinstance(value, (list, tuple, np.ndarray)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (bytes, str)):
    return _text(value)
  return value.item() if isinstance(value, np.generic) else value


class InferenceEvaluator:
  """Decodes and scores `dataset_cfg`'s split (its batch size, lengths and task).

  num_examples: the first N examples of the split (None: all of it).
  log_dir: where PredictionsLogger writes `{task}-predictions.jsonl` (None: not written).
  """

  def __init__(self, dataset_cfg: DatasetConfig, num_examples: Optional[int] = None,
               log_dir: Optional[str] = None):
    if num_examples is not None and num_examples < 1:
      raise errors.UserError(f"num_examples={num_examples}: use a positive number or None for all")
    task = dataset_cfg.task()
    lengths = dict(dataset_cfg.task_feature_lengths)
    self.batch_size = dataset_cfg.batch_size
    self.max_decode_length = lengths["targets"]
    log_dir = log_dir if pod.is_writer() else None
    self._evaluator = seqio.Evaluator(
        mixture_or_task_name=task.name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
        eval_split=dataset_cfg.split, use_cached=dataset_cfg.use_cached, seed=dataset_cfg.seed,
        sequence_length=lengths, num_examples=num_examples, shuffle=False,
        logger_cls=(PredictionsLogger,) if log_dir else (), log_dir=log_dir,
        async_compute_metrics=False)
    if not self._evaluator.eval_tasks:
      raise errors.UserError(f"{task.name} has no task with metric_fns and a {dataset_cfg.split!r} "
                             "split to evaluate; pick another MIXTURE_OR_TASK_NAME or split")

  @property
  def task_names(self) -> Sequence[str]:
    return [task.name for task in self._evaluator.eval_tasks]

  def num_examples(self) -> Mapping[str, int]:
    """Examples scored per task."""
    return {name: sum(1 for _ in ds)
            for name, ds in self._evaluator.cached_task_datasets.items()}

  def evaluate(self, predictor: Optional[Predictor], step: Optional[int] = None,
               predict_batch: Optional[PredictBatchFn] = None) -> TaskMetrics:
    """{task: {metric: value}}; greedy decoding by `predictor` unless `predict_batch` is given."""
    predict_batch = predict_batch or functools.partial(
        predictor.predict, max_decode_length=self.max_decode_length)
    metrics, _ = self._evaluator.evaluate(
        compute_metrics=True, step=step,
        predict_fn=lambda ds, *_: predict_dataset(predict_batch, ds, self.batch_size))
    return {task: {name: float(value) for name, value in task_metrics.items()}
            for task, task_metrics in metrics.result().items()}


@gin.configurable
def inference_metric_name(task: str, metric: str) -> str:
  """T5X's name of an inference-eval metric: 'inference_eval/{task}/{metric}'."""
  return f"inference_eval/{task}/{metric}"


def flat_metric_names(metrics: TaskMetrics) -> Dict[str, float]:
  """{'inference_eval/{task}/{metric}': value}."""
  return {inference_metric_name(task, name): value
          for task, task_metrics in metrics.items() for name, value in task_metrics.items()}


METRICS_FILE = "metrics.json"


def check_checkpoint_path(checkpoint_path: Optional[str]) -> None:
  """Fails early, naming the fix, when CHECKPOINT_PATH is unset or missing."""
  if not checkpoint_path or not epath.Path(checkpoint_path).exists():
    raise errors.MissingPathError(f"CHECKPOINT_PATH {checkpoint_path!r} does not exist; pass "
                                  "--gin.CHECKPOINT_PATH=\"/model_dir/checkpoint_<step>\"")


def restore_predictor(checkpoint_path: str, model: Optional[EncoderDecoderModel] = None,
                      partitioner: Optional[Partitioner] = None, dtype: Optional[str] = None
                      ) -> Tuple[Predictor, Optional[int]]:
  """(predictor, step) of the checkpoint at `checkpoint_path` (any format), on the mesh."""
  check_checkpoint_path(checkpoint_path)
  predictor, step = Predictor.restore(checkpoint_path, partitioner, model, dtype)
  config = predictor.model.config
  logging.info("restored %s (step %s): %d encoder / %d decoder layers, %d heads, %d kv heads, "
               "mesh %s", checkpoint_path, step, config.num_encoder_layers,
               config.num_decoder_layers, config.num_heads, config.num_kv_heads or config.num_heads,
               dict(predictor.partitioner.mesh.shape))
  return predictor, step


def _summary(task: str, split: str, count: int, step: Optional[int],
             metrics: Dict[str, float]) -> str:
  values = ", ".join(f"{name}={value:.3f}" for name, value in sorted(metrics.items()))
  return f"{task} {split} ({count} examples, step {step}): {values}"


@gin.configurable
def evaluate(*, dataset_cfg: DatasetConfig, checkpoint_path: str, output_dir: str,
             num_examples: Optional[int] = None,
             model: Optional[EncoderDecoderModel] = None,
             partitioner: Optional[Partitioner] = None,
             dtype: Optional[str] = None) -> TaskMetrics:
  """Scores the checkpoint on the first `num_examples` (None: all) examples of the split;
  writes metrics.json and the predictions files to `output_dir`; returns {task: {metric: v}}.

  partitioner: the mesh to decode on (default: all devices, no model parallelism); dtype: the
  params' dtype on device (default: the model's activation dtype)."""
  check_checkpoint_path(checkpoint_path)
  if not output_dir:
    raise errors.UserError("EVAL_OUTPUT_DIR is not set; pass --gin.EVAL_OUTPUT_DIR=\"/path\"")
  output = epath.Path(output_dir)
  predictor, step = restore_predictor(checkpoint_path, model, partitioner, dtype)
  if pod.is_writer():  # once the checkpoint is read: a failed run leaves no empty directory
    output.mkdir(parents=True, exist_ok=True)
  pod.barrier("evaluate/output_dir")
  evaluator = InferenceEvaluator(dataset_cfg, num_examples, log_dir=output_dir)
  counts = evaluator.num_examples()
  logging.info("decoding %s with batch size %d", counts, evaluator.batch_size)
  metrics = evaluator.evaluate(predictor, step)
  if pod.is_writer():
    (output / METRICS_FILE).write_text(json.dumps(
        {"checkpoint_path": checkpoint_path, "step": step, "split": dataset_cfg.split,
         "num_examples": counts, "metrics": metrics}, indent=2))
    (output / "config.gin").write_text(gin.config_str())
  pod.barrier("evaluate/written")
  for task, task_metrics in metrics.items():
    logging.info("%s", _summary(task, dataset_cfg.split, counts[task], step, task_metrics))
  return metrics
