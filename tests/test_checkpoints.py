"""Checkpoint readers: HF T5 v1.1, T5X legacy (msgpack + TensorStore zarr), Orbax (ours)."""
import json

import numpy as np
import pytest

from gqa_flax import checkpoints
from gqa_flax.models.config import t5_1_1_config

VOCAB = 64


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny random HF T5 v1.1 model saved as safetensors, and its torch state dict."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  hf_config = transformers.T5Config(
      vocab_size=VOCAB, d_model=8, d_kv=3, d_ff=16, num_layers=2, num_decoder_layers=3,
      num_heads=4, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
      relative_attention_num_buckets=32, relative_attention_max_distance=128)
  model = transformers.T5ForConditionalGeneration(hf_config).eval()
  path = tmp_path_factory.mktemp("hf_t5")
  model.save_pretrained(path, safe_serialization=True)
  state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
  return str(path), state


def test_hf_config_and_weights(hf_dir):
  path, state = hf_dir
  config, params = checkpoints.load(path)
  assert config == t5_1_1_config("tiny", num_decoder_layers=3, vocab_size=VOCAB, dtype=config.dtype)
  np.testing.assert_array_equal(params["token_embedder"]["embedding"], state["shared.weight"])
  # transformers 5 ties lm_head to shared (v1.1 marked by no output scaling): an untied copy.
  np.testing.assert_array_equal(params["decoder"]["logits_dense"]["kernel"], state["lm_head.weight"].T)
  # Each HF name and its T5X counterpart, written out by hand; HF linear weights are [out, in].
  pairs = {
      "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
          ("encoder", "relpos_bias", "rel_embedding"),
      "decoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight":
          ("decoder", "relpos_bias", "rel_embedding"),
      "encoder.block.1.layer.0.SelfAttention.q.weight": ("encoder", "layers_1", "attention", "query", "kernel"),
      "encoder.block.1.layer.0.SelfAttention.o.weight": ("encoder", "layers_1", "attention", "out", "kernel"),
      "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": ("encoder", "layers_0", "mlp", "wi_1", "kernel"),
      "decoder.block.2.layer.0.SelfAttention.k.weight":
          ("decoder", "layers_2", "self_attention", "key", "kernel"),
      "decoder.block.1.layer.1.EncDecAttention.v.weight":
          ("decoder", "layers_1", "encoder_decoder_attention", "value", "kernel"),
      "decoder.block.2.layer.2.DenseReluDense.wo.weight": ("decoder", "layers_2", "mlp", "wo", "kernel"),
  }
  for hf_name, path_parts in pairs.items():
    value = params
    for part in path_parts:
      value = value[part]
    np.testing.assert_array_equal(value, state[hf_name].T, err_msg=hf_name)
  norms = {"encoder.block.1.layer.1.layer_norm.weight": ("encoder", "layers_1", "pre_mlp_layer_norm"),
           "decoder.block.1.layer.1.layer_norm.weight":
               ("decoder", "layers_1", "pre_cross_attention_layer_norm"),
           "decoder.final_layer_norm.weight": ("decoder", "decoder_norm")}
  for hf_name, (stack, *rest) in norms.items():
    value = params[stack]
    for part in rest:
      value = value[part]
    np.testing.assert_array_equal(value["scale"], state[hf_name], err_msg=hf_name)


def test_hf_num_key_value_heads_sets_gqa(hf_dir, tmp_path):
  """A HF config.json that declares num_key_value_heads must have K/V kernels that narrow."""
  path, _ = hf_dir
  hf_config = json.loads(open(f"{path}/config.json").read())
  hf_config["num_key_value_heads"] = 2
  for name in ("config.json", "model.safetensors"):
    (tmp_path / name).write_bytes(open(f"{path}/{name}", "rb").read())
  (tmp_path / "config.json").write_text(json.dumps(hf_config))
  with pytest.raises(ValueError, match=r"mis-shaped arrays: .*decoder/layers_0/self_attention/key/kernel "
                     r"\(8, 12\) \(expected \(8, 6\)\)"):
    checkpoints.load(str(tmp_path))


def test_unrecognised_path(tmp_path):
  with pytest.raises(ValueError, match="is not a recognised checkpoint"):
    checkpoints.load(str(tmp_path))
