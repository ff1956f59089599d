"""The training loop (T5X `train.py`'s `train`); the entry point is `gqa_flax.train`.

Reads top to bottom like T5X's `train.py`: check the configuration, build the mesh and the
(abstract) train state, resume from MODEL_DIR's latest checkpoint or initialise (optionally
from a RestoreCheckpointConfig, e.g. a converted checkpoint for uptraining), then loop over
deterministic batches: train step, progress log, metrics, periodic teacher-forced eval, async
checkpoints. With `infer_eval_dataset_cfg` every saved checkpoint is also decoded and scored
with the task's metrics (T5X's infer_eval, `inference_eval/{task}/{metric}`), which
SaveCheckpointConfig.metric_name_to_monitor can keep the best checkpoints by.
`train(...)` is gin-configurable and returns a summary dict.
"""
import logging
import math
from typing import Any, Callable, Dict, Optional

import gin
import jax
import optax
from etils import epath

from gqa_flax import errors, pod
from gqa_flax.training import checkpointing, data_pipeline, evaluation, trainer
from gqa_flax.training.adafactor import adafactor
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.metrics_writer import MetricsWriter
from gqa_flax.training.partitioning import Partitioner
from gqa_flax.training.predictor import Predictor


def _input_shapes(cfg: data_pipeline.DatasetConfig) -> Dict[str, tuple]:
  return {"encoder_input_tokens": (1, cfg.task_feature_lengths["inputs"]),
          "decoder_input_tokens": (1, cfg.task_feature_lengths["targets"])}


def _check_finite(pending: list, checkpointer: checkpointing.Checkpointer) -> None:
  """Raises FloatingPointError naming the first step whose loss is not finite."""
  for step, loss in pending:
    if not math.isfinite(float(loss)):
      checkpointer.wait_until_finished()
      raise FloatingPointError(
          f"non-finite loss {float(loss)} at step {step}; stopped without saving it, the last "
          f"good checkpoint is step {checkpointer.latest_step()} -- lower the learning rate or "
          "check the data")
  pending.clear()


def evaluate_loss(model: EncoderDecoderModel, params: Any, partitioner: Partitioner,
                  cfg: data_pipeline.DatasetConfig, eval_steps: int) -> Dict[str, float]:
  """Teacher-forced metrics of the first `eval_steps` batches of one epoch of `cfg` (T5X's
  train_eval), weighted by each batch's target tokens; `num_target_tokens` is their sum.

  Every host runs exactly `eval_steps` steps: a shard with fewer batches is padded with
  all-zero batches, which carry no target tokens and so count for nothing.
  """
  eval_step = jax.jit(trainer.make_eval_step(model))
  ds = data_pipeline.get_dataset(cfg, partitioner.data_layout(cfg.batch_size), num_epochs=1,
                                 pad_to=eval_steps)
  totals: Dict[str, float] = {}
  for batch in data_pipeline.as_numpy(ds):
    metrics = jax.device_get(eval_step(params, partitioner.global_batch(batch, cfg.batch_size)))
    tokens = float(metrics["num_target_tokens"])
    for name, value in metrics.items():
      weight = 1.0 if name == "num_target_tokens" else tokens
      totals[name] = totals.get(name, 0.0) + weight * float(value)
  tokens = max(totals.get("num_target_tokens", 0.0), 1.0)
  return {name: value if name == "num_target_tokens" else value / tokens
          for name, value in totals.items()}


@gin.configurable
def train(*, model: EncoderDecoderModel, train_dataset_cfg: data_pipeline.DatasetConfig,
          model_dir: Optional[str], total_steps: int,
          learning_rate_fn: Callable[[jax.Array], jax.Array],
          optimizer: Optional[optax.GradientTransformation] = None,
          partitioner: Optional[Partitioner] = None,
          checkpoint_cfg: checkpointing.CheckpointConfig = checkpointing.CheckpointConfig(),
          train_eval_dataset_cfg: Optional[data_pipeline.DatasetConfig] = None,
          eval_period: int = 1000, eval_steps: int = 20, stats_period: int = 100,
          infer_eval_dataset_cfg: Optional[data_pipeline.DatasetConfig] = None,
          infer_eval_num_examples: Optional[int] = None,
          random_seed: int = 0) -> Dict[str, Any]:
  """Trains until global step `total_steps`; returns {'step', 'loss', 'first_loss', ...}.

  infer_eval_dataset_cfg: a split decoded and scored at every checkpoint save (its first
  `infer_eval_num_examples` examples, None: all).
  """
  optimizer = optimizer or adafactor()
  partitioner = partitioner or Partitioner()
  if not model_dir:
    raise errors.UserError("MODEL_DIR is not set; pass --gin.MODEL_DIR=\"/path/to/run\"")
  partitioner.check_batch_size(train_dataset_cfg.batch_size)
  checkpointer = checkpointing.Checkpointer(model_dir, checkpoint_cfg.save)
  resuming = checkpointer.latest_step() is not None
  restore_dir = None if resuming else checkpoint_cfg.restore.checkpoint_dir()
  train_dataset_cfg.task()
  inference_evaluator = None if infer_eval_dataset_cfg is None else \
      evaluation.InferenceEvaluator(infer_eval_dataset_cfg, infer_eval_num_examples)
  layout = partitioner.data_layout(train_dataset_cfg.batch_size)
  if pod.is_writer():
    epath.Path(model_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(model_dir) / "config.gin").write_text(gin.config_str())
  pod.barrier("train/model_dir")

  input_shapes = _input_shapes(train_dataset_cfg)
  boxed = trainer.abstract_params(model, input_shapes)
  shardings = trainer.state_shardings(partitioner, optimizer, boxed)
  if resuming:
    abstract = trainer.abstract_train_state(optimizer, boxed, shardings)
    state, batches_consumed = checkpointer.restore_latest(abstract)
    logging.info("resumed from %s at step %d", model_dir, int(state.step))
  else:
    state = trainer.init_train_state(model, optimizer, input_shapes, shardings, random_seed)
    batches_consumed = 0
    if restore_dir is not None:
      state = checkpointing.restore_from(checkpoint_cfg.restore, restore_dir, state)
      logging.info("restored %s: step %d", restore_dir, int(state.step))
  start_step = int(state.step)
  summary: Dict[str, Any] = {"start_step": start_step, "restored_from": restore_dir,
                             "resumed": resuming}

  train_step = trainer.jit_train_step(
      partitioner, trainer.make_train_step(model, optimizer, learning_rate_fn, random_seed),
      shardings)
  batches = data_pipeline.as_numpy(data_pipeline.get_dataset(
      train_dataset_cfg, layout, batches_consumed=batches_consumed))
  writer = MetricsWriter(model_dir, start_step, total_steps, enabled=pod.is_writer())
  pending, tokens, metrics = [], 0.0, None
  try:
    for step in range(start_step + 1, total_steps + 1):
      batch = partitioner.global_batch(next(batches), train_dataset_cfg.batch_size)
      state, metrics = train_step(state, batch)
      batches_consumed += 1
      pending.append((step, metrics["loss"]))
      tokens += train_dataset_cfg.batch_size * train_dataset_cfg.task_feature_lengths["targets"]
      final = step == total_steps
      if step % stats_period == 0 or final or checkpointer.manager.should_save(step):
        _check_finite(pending, checkpointer)
        scalars = {name: float(value) for name, value in jax.device_get(metrics).items()}
        scalars.update(writer.log_progress(step, scalars["loss"], scalars["learning_rate"], tokens))
        writer.write(step, scalars)
        summary.setdefault("first_loss", scalars["cross_ent_loss_per_target_token"])
        tokens = 0.0
      eval_metrics = None
      if train_eval_dataset_cfg is not None and (step % eval_period == 0 or final):
        eval_metrics = {f"train_eval/{name}": value for name, value in evaluate_loss(
            model, state.params, partitioner, train_eval_dataset_cfg, eval_steps).items()}
        writer.write(step, eval_metrics)
      if inference_evaluator is not None and (final or checkpointer.manager.should_save(step)):
        scores = evaluation.flat_metric_names(inference_evaluator.evaluate(
            Predictor(model, state.params, partitioner), step))
        writer.write(step, scores)
        eval_metrics = {**(eval_metrics or {}), **scores}
      checkpointer.save(state, model.config, batches_consumed, metrics=eval_metrics, force=final)
    if metrics is not None:
      summary.update({name: float(value) for name, value in jax.device_get(metrics).items()})
  finally:
    checkpointer.wait_until_finished()
    checkpointer.close()
    writer.close()
  summary.update(step=int(state.step), model_dir=model_dir, params=state.params)
  return summary
