"""The held-out loss stage and the fine-tuned models' test loss: each example's loss equals a
numpy cross entropy of its logits."""
import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import seqio

from gqa_flax import checkpoints
from gqa_flax.checkpoints.convert import kv_head_similarity
from gqa_flax.checkpoints.reader import open_checkpoint
from gqa_flax.models import t5_1_1_config
from gqa_flax.reproduce import heldout
from gqa_flax.training import data_pipeline, evaluation, predictor
from gqa_flax.training.partitioning import Partitioner
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from tests import training_task
from tests.test_convert import T5X_TINY

LENGTHS = {"inputs": 32, "targets": 16}


def _model_and_checkpoint(tmp_path):
  config = t5_1_1_config("tiny", vocab_size=training_task.VOCAB_SIZE, num_encoder_layers=1,
                         num_decoder_layers=1, num_kv_heads=2, dtype="float32")
  model = EncoderDecoderModel(config)
  boxed = model.init(jax.random.key(1), {"encoder_input_tokens": (1, 8),
                                         "decoder_input_tokens": (1, 8)})
  params = jax.tree.map(lambda x: np.asarray(x) * 3.0, nn.meta.unbox(boxed))
  checkpoints.save(str(tmp_path / "ckpt"), 5, params, config)
  return model, params


def _numpy_losses(model, params, num_examples: int) -> np.ndarray:
  """Each validation example's mean token cross entropy, from its logits in float64 numpy."""
  ds = seqio.EncDecFeatureConverter(pack=False)(seqio.get_mixture_or_task(
      training_task.TASK_NAME).get_dataset(LENGTHS, split="validation", shuffle=False,
                                           num_epochs=1), LENGTHS)
  expected = []
  for example in ds.take(num_examples).as_numpy_iterator():
    logits = np.asarray(model.module.apply(
        {"params": params}, example["encoder_input_tokens"][None],
        example["decoder_input_tokens"][None], example["decoder_target_tokens"][None]),
        np.float64)[0]
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                keepdims=True)) - logits.max(-1, keepdims=True)
    weights = example["decoder_loss_weights"].astype(bool)
    picked = log_probs[np.arange(len(logits)), example["decoder_target_tokens"]]
    expected.append(-picked[weights].mean())
  return np.asarray(expected)


def test_heldout_losses_are_each_examples_mean_token_cross_entropy(tmp_path):
  model, params = _model_and_checkpoint(tmp_path)
  task_gin = tmp_path / "task.gin"
  task_gin.write_text(f"MIXTURE_OR_TASK_NAME = '{training_task.TASK_NAME}'\n"
                      "MIXTURE_OR_TASK_MODULE = 'tests.training_task'\n"
                      f"TASK_FEATURE_LENGTHS = {LENGTHS}\n")
  output = tmp_path / "heldout.json"
  assert heldout.main([f"--output={output}", f"--task_gin={task_gin}", "--num_examples=8",
                       "--batch_size=4", f"--score=gqa2={tmp_path}/ckpt",
                       f"--score=gqa2/s1={tmp_path}/ckpt", f"--similarity=tiny={T5X_TINY}"]) == 0
  written = json.loads(output.read_text())
  assert written["num_examples"] == 8 and written["task"] == training_task.TASK_NAME
  losses = np.array(written["losses"]["gqa2"])
  assert written["losses"]["gqa2/s1"] == written["losses"]["gqa2"]  # one checkpoint, scored once
  np.testing.assert_allclose(losses, _numpy_losses(model, params, 8), rtol=2e-5)
  assert len(set(np.round(losses, 4))) > 1  # examples differ
  # The pre-trained model's head similarity, read in this stage for the report.
  assert written["kv_head_similarity"] == {"tiny": pytest.approx(
      kv_head_similarity(open_checkpoint(T5X_TINY)))}


def test_fine_tuned_test_losses_are_the_decoded_examples_cross_entropies(tmp_path):
  """The evaluate stage's per-example test loss: 7 examples in batches of 4 (the last one
  padded, its padding dropped), equal to numpy's cross entropy of each example."""
  model, params = _model_and_checkpoint(tmp_path)
  decoder = predictor.from_host_params(model, params, Partitioner())
  cfg = data_pipeline.DatasetConfig(training_task.TASK_NAME, LENGTHS, split="validation",
                                    batch_size=4, shuffle=False, pack=False,
                                    module="tests.training_task")
  losses, tokens = evaluation.per_example_losses(decoder, cfg, 7)
  np.testing.assert_allclose(losses, _numpy_losses(model, params, 7), rtol=2e-5)
  assert len(tokens) == 7 and tokens.all()
