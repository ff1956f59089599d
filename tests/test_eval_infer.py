"""gqa-eval, gqa-infer and best-by-metric checkpoints on the paper-lines task (byte vocabulary).

References: greedy decoding re-done without the decode cache (one full forward pass per token),
beam search run directly on inputs tokenized by hand, ROUGE/BLEU recomputed with rouge_score and
sacrebleu directly, the validation lines read from the paper text, and kept checkpoints compared
with the argmax/argmin of the metrics given.
"""
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sacrebleu
import seqio
from rouge_score import rouge_scorer

from gqa_flax import decoding
from gqa_flax.checkpoints import save
from gqa_flax.models import t5_1_1_config
from gqa_flax.training import adafactor, checkpointing, evaluation, inference, loop, schedules
from gqa_flax.training.data_pipeline import DatasetConfig
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.trainer import TrainState
from tests import training_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 32, "targets": 16}
CONFIG = t5_1_1_config("tiny", vocab_size=training_task.VOCAB_SIZE, num_encoder_layers=1,
                       num_decoder_layers=1, dtype="float32")
VOCAB = seqio.ByteVocabulary()
STEP = 7


def _dataset_cfg(split="validation", batch_size=4):
  return DatasetConfig(training_task.TASK_NAME, LENGTHS, split=split, batch_size=batch_size,
                       shuffle=False, seed=42, pack=False, module="tests.training_task")


def _validation_lines(n):
  with open(training_task.PAPER_TEXT) as f:
    lines = [line.strip() for line in f if len(line.strip()) > 20]
  return [line for i, line in enumerate(lines) if i % 10 == 0][:n]


def _saved(directory, params):
  """(step directory, params) of `params` saved at STEP in `directory`."""
  save(str(directory), STEP, params, CONFIG)
  return os.path.join(str(directory), f"checkpoint_{STEP}"), params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """(step directory, params) of a freshly initialised tiny GQA model."""
  model = EncoderDecoderModel(CONFIG)
  params = nn.meta.unbox(model.init(jax.random.key(3), {"encoder_input_tokens": (1, 8),
                                                         "decoder_input_tokens": (1, 8)}))
  return _saved(tmp_path_factory.mktemp("ckpt"), jax.device_get(params))


def _uncached_greedy(params, text):
  """Greedy decoding of `text` with full forward passes (no cache), as text. The input is cut
  like the task cuts it (append_eos, then the feature converter's trim); the texts given to
  `infer` as a file are shorter than the inputs length."""
  ids = (VOCAB.encode(text) + [1])[:LENGTHS["inputs"]]
  encoder = jnp.asarray([ids + [0] * (LENGTHS["inputs"] - len(ids))], jnp.int32)
  apply = jax.jit(lambda dec: EncoderDecoderModel(CONFIG).module.apply(
      {"params": params}, encoder, dec))
  out = []
  while len(out) < LENGTHS["targets"] and (not out or out[-1] != 1):
    decoder_inputs = [0] + out + [0] * (LENGTHS["targets"] - 1 - len(out))
    logits = apply(jnp.asarray([decoder_inputs], jnp.int32))
    out.append(int(jnp.argmax(logits[0, len(out)])))
  return VOCAB.decode(out)


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_eval_cli_writes_every_metric_and_the_greedy_predictions(checkpoint, tmp_path):
  path, params = checkpoint
  out_dir = str(tmp_path / "eval")
  args = [sys.executable, "-m", "gqa_flax.eval", "--gin_file=runs/eval.gin",
          f"--gin.CHECKPOINT_PATH='{path}'", f"--gin.EVAL_OUTPUT_DIR='{out_dir}'",
          f"--gin.MIXTURE_OR_TASK_NAME='{training_task.TASK_NAME}'",
          "--gin.MIXTURE_OR_TASK_MODULE='tests.training_task'",
          f"--gin.TASK_FEATURE_LENGTHS={LENGTHS}", "--gin.EVAL_SPLIT='validation'",
          "--gin.EVAL_MAX_EXAMPLES=5", "--gin.BATCH_SIZE=4"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with open(os.path.join(out_dir, "metrics.json")) as f:
    report = json.load(f)
  task = training_task.TASK_NAME
  assert report["step"] == STEP and report["split"] == "validation"
  assert report["num_examples"] == {task: 5}
  assert set(report["metrics"][task]) == {"rouge1", "rouge2", "rougeLsum", "bleu"}
  assert f"{task}: bleu=" in out.stdout
  records = _read_jsonl(os.path.join(out_dir, f"{task}-predictions.jsonl"))
  lines = _validation_lines(5)
  assert [r["inputs"] for r in records] == lines == [r["targets"] for r in records]
  for record in records[:2]:  # batch 1 and the zero-padded last batch agree with the reference
    assert record["prediction"] == _uncached_greedy(params, record["inputs"])
  assert records[4]["prediction"] == _uncached_greedy(params, records[4]["inputs"])
  bleu = sacrebleu.corpus_bleu([r["prediction"] for r in records], [lines], tokenize="intl")
  assert report["metrics"][task]["bleu"] == pytest.approx(bleu.score, abs=1e-6)


def test_evaluator_scores_postprocessed_predictions_like_rouge_score_and_sacrebleu():
  """A copy of the inputs' first 16 tokens is a partly right prediction of every line."""
  evaluator = evaluation.InferenceEvaluator(_dataset_cfg(), num_examples=6)
  scores = evaluator.evaluate(None, None, predict_batch=lambda x: x[:, :LENGTHS["targets"]])
  lines = _validation_lines(6)
  predictions = [VOCAB.decode(VOCAB.encode(line)[:LENGTHS["targets"]]) for line in lines]
  scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2"])
  rouge = {k: 100 * np.mean([scorer.score(t, p)[k].fmeasure for t, p in zip(lines, predictions)])
           for k in ("rouge1", "rouge2")}
  bleu = sacrebleu.corpus_bleu(predictions, [lines], tokenize="intl").score
  metrics = scores[training_task.TASK_NAME]
  assert 10 < rouge["rouge1"] < 90 and bleu > 0
  assert metrics["rouge1"] == pytest.approx(rouge["rouge1"], abs=3.0)  # bootstrap mid vs mean
  assert metrics["rouge2"] == pytest.approx(rouge["rouge2"], abs=3.0)
  assert metrics["bleu"] == pytest.approx(bleu, abs=1e-6)


def test_infer_decodes_a_text_file_and_a_task_split(checkpoint, tmp_path):
  path, params = checkpoint
  inputs_file = tmp_path / "inputs.txt"
  inputs_file.write_text("Grouped-query attention\n\nhello world\n")
  written = inference.infer(dataset_cfg=_dataset_cfg(batch_size=2), checkpoint_path=path,
                            output_dir=str(tmp_path / "file"), inputs_file=str(inputs_file))
  records = _read_jsonl(written)
  assert [r["inputs"] for r in records] == ["Grouped-query attention", "hello world"]
  assert all("targets" not in r for r in records)
  assert [r["prediction"] for r in records] == [_uncached_greedy(params, r["inputs"])
                                                for r in records]
  records = _read_jsonl(inference.infer(dataset_cfg=_dataset_cfg(batch_size=2),
                                        checkpoint_path=path, output_dir=str(tmp_path / "split"),
                                        num_examples=3))
  assert [r["targets"] for r in records] == _validation_lines(3)


def test_infer_with_beam_size_writes_the_best_beam(checkpoint, tmp_path):
  """`infer(beam_size=3)` writes, per input line and in order, the best beam of
  `decoding.beam_search` (checked against exhaustive search in test_model) run on the line
  tokenized here by hand. Weights x4 make the beams' texts differ and not all empty."""
  path, params = _saved(tmp_path / "ckpt", jax.tree_util.tree_map(lambda x: 4 * x,
                                                                  checkpoint[1]))
  lines = ["Grouped-query attention", "hello world", "multi-query"]
  inputs_file = tmp_path / "inputs.txt"
  inputs_file.write_text("\n".join(lines) + "\n")
  records = _read_jsonl(inference.infer(dataset_cfg=_dataset_cfg(batch_size=2),
                                        checkpoint_path=path, output_dir=str(tmp_path / "beam"),
                                        inputs_file=str(inputs_file), beam_size=3, alpha=0.6))
  ids = [VOCAB.encode(line) + [1] for line in lines]
  encoder = jnp.asarray([i + [0] * (LENGTHS["inputs"] - len(i)) for i in ids], jnp.int32)
  tokens, _ = decoding.beam_search(EncoderDecoderModel(CONFIG).module, params, encoder,
                                   LENGTHS["targets"], beam_size=3, alpha=0.6)
  texts = [[VOCAB.decode(beam.tolist()) for beam in beams] for beams in np.asarray(tokens)]
  assert any(best for best, *_ in texts) and any(best != second for best, second, _ in texts)
  assert [r["inputs"] for r in records] == lines
  assert [r["prediction"] for r in records] == [best for best, *_ in texts]


def test_bad_checkpoint_path_fails_naming_the_fix(tmp_path):
  with pytest.raises(FileNotFoundError, match="pass --gin.CHECKPOINT_PATH"):
    evaluation.evaluate(dataset_cfg=_dataset_cfg(), checkpoint_path=str(tmp_path / "missing"),
                        output_dir=str(tmp_path))


def _tiny_state(value):
  return TrainState(step=jnp.asarray(0, jnp.int32), params={"w": jnp.full((2,), value)},
                    param_states={})


@pytest.mark.parametrize("name,mode", [("inference_eval/t/bleu", "max"),
                                       ("train_eval/loss", "min")])
def test_checkpointer_keeps_the_best_by_the_monitored_metric(tmp_path, name, mode):
  bleu, loss = [3.0, 9.0, 5.0, 1.0], [1.0, 3.0, 0.5, 2.0]  # best bleu: step 2, best loss: 3
  checkpointer = checkpointing.Checkpointer(str(tmp_path), checkpointing.SaveCheckpointConfig(
      period=1, keep=1, metric_name_to_monitor=name, metric_mode=mode))
  for step in range(1, 5):
    state = _tiny_state(float(step)).replace(step=jnp.asarray(step, jnp.int32))
    checkpointer.save(state, CONFIG, step, metrics={"inference_eval/t/bleu": bleu[step - 1],
                                                    "train_eval/loss": loss[step - 1]})
  checkpointer.wait_until_finished()
  expected = 1 + (int(np.argmax(bleu)) if mode == "max" else int(np.argmin(loss)))
  assert checkpointer.manager.all_steps() == [expected]
  with pytest.raises(ValueError, match="not among the step's metrics"):
    checkpointer.save(_tiny_state(0.0).replace(step=jnp.asarray(5, jnp.int32)), CONFIG, 5,
                      metrics={"other": 1.0})
  checkpointer.close()


@pytest.mark.slow
def test_training_scores_each_saved_checkpoint_and_keeps_the_best(tmp_path):
  metric = evaluation.inference_metric_name(training_task.TASK_NAME, "rouge1")
  model_dir = str(tmp_path / "run")
  loop.train(model=EncoderDecoderModel(CONFIG), train_dataset_cfg=_dataset_cfg("train", 8),
             model_dir=model_dir, total_steps=4,
             learning_rate_fn=schedules.create_learning_rate_scheduler("constant", 0.01),
             optimizer=adafactor.adafactor(),
             checkpoint_cfg=checkpointing.CheckpointConfig(save=checkpointing.SaveCheckpointConfig(
                 period=2, keep=1, metric_name_to_monitor=metric, metric_mode="max")),
             infer_eval_dataset_cfg=_dataset_cfg(), infer_eval_num_examples=4, stats_period=4)
  with open(os.path.join(model_dir, "metrics.jsonl")) as f:
    scored = {r["step"]: r for r in map(json.loads, f) if metric in r}
  assert sorted(scored) == [2, 4]  # every `period` steps (not the first step: see checkpointing)
  assert all(set(r) >= {metric, metric.replace("rouge1", "bleu")} for r in scored.values())
  kept = [int(n.split("_")[1]) for n in os.listdir(model_dir) if n.startswith("checkpoint_")]
  assert len(kept) == 1 and scored[kept[0]][metric] == max(r[metric] for r in scored.values())
