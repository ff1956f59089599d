"""Calibration for `gqa-convert --method aligned`: the key/value inputs' grams equal those of
the normalised activations Flax captures, and the CLI calibrates on a task's examples."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from gqa_flax import calibration, checkpoints
from gqa_flax.checkpoints import orbax_format
from gqa_flax.checkpoints.arrays import LazyArray, flatten
from gqa_flax.checkpoints.convert import convert_arrays
from gqa_flax.convert import main
from gqa_flax.models import Transformer, t5_1_1_config
import test_grouped_conversion as grouped

CONFIG = t5_1_1_config("tiny", dtype="float32", vocab_size=700, num_heads=4, head_dim=3,
                       num_decoder_layers=2)


def _params(seed=0):
  tokens = jnp.ones((1, 4), jnp.int32)
  return meta.unbox(Transformer(CONFIG).init(jax.random.PRNGKey(seed), tokens, tokens)["params"])


def test_grams_are_those_of_the_normalised_inputs_without_padding():
  """Reference: the outputs of the layer norms before each decoder attention (self) and of
  the encoder's final norm (cross), from Flax's capture_intermediates, masked by hand."""
  params, rng = _params(), np.random.default_rng(0)
  batch = {"encoder_input_tokens": np.array([[5, 9, 3, 1, 0, 0], [7, 2, 2, 8, 4, 1]]),
           "decoder_input_tokens": np.array([[0, 6, 4, 0], [0, 3, 5, 7]]),
           "decoder_target_tokens": np.array([[6, 4, 1, 0], [3, 5, 7, 1]])}
  batches = [batch, {k: rng.integers(1, 600, v.shape) for k, v in batch.items()}]
  read = []
  arrays = {name: LazyArray(value.shape, value.dtype, lambda name=name, value=value: read.append(
      name) or np.asarray(value)) for name, value in flatten(params).items()}
  grams = calibration.kv_input_grams(CONFIG, arrays, batches)
  # Streaming: each array read once, the decoder's final norm and logits never.
  assert sorted(read) == sorted(n for n in arrays if not n.startswith(
      ("decoder/decoder_norm", "decoder/logits_dense")))
  assert sorted(grams) == [f"decoder/layers_{i}/{kind}" for i in range(2)
                           for kind in ("encoder_decoder_attention", "self_attention")]
  expected = {}
  for b in batches:
    _, state = Transformer(CONFIG).apply(
        {"params": params}, b["encoder_input_tokens"], b["decoder_input_tokens"],
        b["decoder_target_tokens"], capture_intermediates=True, mutable=["intermediates"])
    found = state["intermediates"]
    encoded = np.asarray(found["encoder"]["encoder_norm"]["__call__"][0])
    encoded = encoded * (b["encoder_input_tokens"] > 0)[..., None]
    for i in range(2):
      x = np.asarray(found["decoder"][f"layers_{i}"]["pre_self_attention_layer_norm"][
          "__call__"][0]) * (b["decoder_target_tokens"] > 0)[..., None]
      for kind, inputs in (("self_attention", x), ("encoder_decoder_attention", encoded)):
        name = f"decoder/layers_{i}/{kind}"
        expected[name] = expected.get(name, 0) + np.einsum("ble,blf->ef", inputs, inputs)
  for name, gram in grams.items():
    np.testing.assert_allclose(gram, expected[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_tokens_outside_the_vocabulary_are_one_line():
  """A task whose ids the model cannot embed (jnp.take would give NaN grams) is refused."""
  arrays = {name: LazyArray(value.shape, value.dtype, lambda value=value: np.asarray(value))
            for name, value in flatten(_params()).items()}
  batch = {"encoder_input_tokens": np.array([[5, CONFIG.vocab_size]]),
           "decoder_input_tokens": np.array([[0, 6]]), "decoder_target_tokens": np.array([[6, 1]])}
  with pytest.raises(ValueError, match=f"token id {CONFIG.vocab_size}, outside the model's "
                     f"vocabulary of {CONFIG.vocab_size}"):
    calibration.kv_input_grams(CONFIG, arrays, [batch])


def test_aligned_with_grams_keeps_a_model_of_rotated_copies_exact():
  """Rotated copies pool exactly in any metric: aligned GQA-2 with calibration grams of
  random activations still equals the multi-head model (test_grouped_conversion's case)."""
  flat = grouped.rotated_copies()
  rng = np.random.default_rng(4)
  grams = {f"decoder/layers_{i}/{kind}": (lambda x: x.T @ x)(rng.normal(size=(30, 8)) * 3)
           for i in range(2) for kind in ("self_attention", "encoder_decoder_attention")}
  config, aligned, _ = convert_arrays(grouped._source(flat), 2, method="aligned", grams=grams)
  np.testing.assert_allclose(grouped._logits(config, {n: a.read() for n, a in aligned.items()}),
                             grouped._logits(grouped.CONFIG, flat), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cli_calibrates_on_the_task_and_records_it(tmp_path, mini_data_dir, monkeypatch):
  monkeypatch.setenv("GQA_DATA_DIR", str(mini_data_dir))
  src = tmp_path / "mha"
  orbax_format.save(str(src), 7, _params(seed=1), CONFIG)
  argv = ["--src", str(src / "checkpoint_7"), "--num_kv_heads", "2", "--method", "aligned",
          "--calibration_task_gin", "reproduce/mini/span_corruption.gin",
          "--calibration_split", "validation", "--calibration_examples", "8",
          "--calibration_batch_size", "4"]
  assert main(argv + ["--dst", str(tmp_path / "calibrated")]) == 0
  assert main(argv[:6] + ["--dst", str(tmp_path / "kernels")]) == 0
  calibrated = checkpoints.load_checkpoint(str(tmp_path / "calibrated"))
  assert calibrated.metadata["calibration"] == {
      "task_gin": "reproduce/mini/span_corruption.gin", "split": "validation", "examples": 8}
  kernels = flatten(checkpoints.load_checkpoint(str(tmp_path / "kernels")).params)
  # the metric changes the rotations: the pooled kernels differ from the kernels-only ones
  name = "decoder/layers_0/self_attention/key/kernel"
  assert not np.allclose(flatten(calibrated.params)[name], kernels[name])


def test_calibration_is_refused_for_other_methods(tmp_path, capsys):
  assert main(["--src", "x", "--dst", str(tmp_path / "d"), "--num_kv_heads", "1",
               "--calibration_task_gin", "reproduce/mini/span_corruption.gin"]) == 1
  err = capsys.readouterr().err.strip()
  assert "calibrates --method aligned, not mean" in err and len(err.splitlines()) == 1
