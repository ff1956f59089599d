"""Against an independent reference: HF transformers' PyTorch T5 v1.1 with random weights."""
import jax.numpy as jnp
import numpy as np
import pytest

from gqa_flax import checkpoints, decoding
from gqa_flax.models import Transformer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _save_hf_model(path, spread_weights, v1_1=True):
  """A T5 v1.1-style model (gated-gelu, untied head) saved with safetensors; with
  `v1_1=False` the original T5 (ReLU MLP, head tied to the embedding and scaled)."""
  torch.manual_seed(0)
  config = transformers.T5Config(
      vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
      num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
      feed_forward_proj="gated-gelu" if v1_1 else "relu", tie_word_embeddings=not v1_1,
      dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
  model = transformers.T5ForConditionalGeneration(config).eval()
  if spread_weights:  # HF's init makes greedy repeat one token; spread the weights out
    with torch.no_grad():
      for name, weight in model.named_parameters():
        scale = 0.1 if "layer_norm" in name else (0.5 if "relative_attention_bias" in name else 0.3)
        weight.copy_((1.0 if "layer_norm" in name else 0.0) + scale * torch.randn_like(weight))
  model.save_pretrained(path, safe_serialization=True)
  return path, model


@pytest.fixture(scope="module")
def hf_model_dir(tmp_path_factory):
  """HF's own initialisation: well conditioned, so float32 logits agree to 1e-4."""
  return _save_hf_model(tmp_path_factory.mktemp("hf_t5"), spread_weights=False)


@pytest.fixture(scope="module")
def hf_spread_model_dir(tmp_path_factory):
  """Larger weights, so greedy decoding takes varied paths (float32 logits then differ
  from a float64 reference by ~3e-4, for HF and for us alike)."""
  return _save_hf_model(tmp_path_factory.mktemp("hf_t5_spread"), spread_weights=True)


def _inputs():
  rng = np.random.RandomState(0)
  inputs = rng.randint(2, 96, (3, 40))
  inputs[1, 25:] = 0  # padding
  targets = rng.randint(2, 96, (3, 45))
  return inputs, np.pad(targets[:, :-1], ((0, 0), (1, 0)))


@pytest.fixture(scope="module")
def hf_original_t5_dir(tmp_path_factory):
  return _save_hf_model(tmp_path_factory.mktemp("hf_t5_v1_0"), spread_weights=False, v1_1=False)


@pytest.mark.parametrize("fixture", ["hf_model_dir", "hf_original_t5_dir"])
def test_encoder_outputs_and_logits_match_hf(fixture, request):
  path, hf = request.getfixturevalue(fixture)
  config, params = checkpoints.load(str(path))
  assert (config.num_heads, config.num_kv_heads, config.num_decoder_layers) == (4, 4, 3)
  assert config.logits_via_embedding == (fixture == "hf_original_t5_dir")
  model = Transformer(config.replace(dtype="float32"))
  inputs, decoder_inputs = _inputs()
  with torch.no_grad():
    hf_out = hf(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                decoder_input_ids=torch.tensor(decoder_inputs))
  encoded = model.apply({"params": params}, jnp.asarray(inputs), method=Transformer.encode)
  real = inputs > 0  # HF computes padded positions too; only real ones are defined
  np.testing.assert_allclose(np.asarray(encoded)[real],
                             hf_out.encoder_last_hidden_state.numpy()[real], atol=1e-4)
  logits = model.apply({"params": params}, inputs, decoder_inputs, np.ones_like(decoder_inputs))
  np.testing.assert_allclose(logits, hf_out.logits.numpy(), atol=1e-4)


def test_greedy_decoding_matches_hf_generate(hf_spread_model_dir):
  path, hf = hf_spread_model_dir
  config, params = checkpoints.load(str(path))
  model = Transformer(config.replace(dtype="float32"))
  inputs, _ = _inputs()
  length = 20
  # use_cache=False: HF 5.23's decoder cache assumes as many decoder layers as encoder ones.
  with torch.no_grad():
    expected = hf.generate(input_ids=torch.tensor(inputs), attention_mask=torch.tensor(inputs > 0),
                           do_sample=False, num_beams=1, max_new_tokens=length,
                           use_cache=False).numpy()[:, 1:]
  expected = np.pad(expected, ((0, 0), (0, length - expected.shape[1])))  # HF stops at all-EOS
  got = decoding.greedy_decode(model, params, jnp.asarray(inputs), max_decode_length=length)
  assert all(len(set(row)) > 3 for row in expected.tolist()), expected  # not degenerate
  np.testing.assert_array_equal(got, expected)
