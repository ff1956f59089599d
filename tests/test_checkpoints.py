"""Checkpoint readers: HF T5 v1.1, T5X legacy (msgpack + TensorStore zarr), Orbax (ours)."""
import gzip
import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import serialization

from gqa_flax import checkpoints
from gqa_flax.checkpoints import t5x_legacy
from gqa_flax.checkpoints.arrays import flatten
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


FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "t5x"


def test_tensorstore_zarr_arrays_read_right_values():
  """tiny_t5/checkpoint_1: zarr arrays (kvstore 'gfile', relative paths, no .zarray)."""
  directory = FIXTURES / "tiny_t5" / "checkpoint_1"
  tree = t5x_legacy.read_tree(str(directory))
  states = tree["optimizer"]["state"]["param_states"]
  assert int(tree["optimizer"]["state"]["step"].read()) == 1
  # Independent reading: gunzip each zarr chunk file and view its C-order bytes.
  raw = lambda name, chunk, dtype, shape: np.frombuffer(
      gzip.decompress((directory / f"state.param_states.{name}" / chunk).read_bytes()),
      dtype).reshape(shape)
  for name, chunk, dtype, shape in (("kernel", "0.0", "<f8", (10, 5)), ("bias", "0", "<f4", (5,)),
                                    ("step", "0", "<i4", ())):
    value = states[name].read()
    assert value.shape == shape and value.dtype == np.dtype(dtype), name
    np.testing.assert_array_equal(value, raw(name, chunk, dtype, shape))
  kernel = states["kernel"].read()
  assert ((0 <= kernel) & (kernel < 1)).all() and len(np.unique(kernel)) == 50  # Uniform draws.
  np.testing.assert_array_equal(states["bias"].read(), np.ones(5, np.float32))
  assert states["step"].read() == 1


def test_real_t5x_checkpoint_loads_with_inferred_config():
  """test_t5_tiny.checkpoint_0, written by T5X: a msgpack FILE with all arrays inline."""
  path = str(FIXTURES / "test_t5_tiny.checkpoint_0")
  loaded = checkpoints.load_checkpoint(path)
  assert loaded.config == t5_1_1_config("tiny", vocab_size=32128, dtype=loaded.config.dtype)
  assert loaded.step == 0
  raw = serialization.msgpack_restore((FIXTURES / "test_t5_tiny.checkpoint_0").read_bytes())
  expected = flatten(raw["optimizer"]["target"])
  got = flatten(loaded.params)
  assert got.keys() == expected.keys() and len(got) == 52
  for name, value in expected.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert got["decoder/layers_1/encoder_decoder_attention/key/kernel"].shape == (8, 12)


def test_orbax_round_trip_and_gcs_kvstore(tmp_path):
  """Our Orbax layout round-trips; legacy zarr specs with a 'gcs' kvstore read locally."""
  path = str(FIXTURES / "test_t5_tiny.checkpoint_0")
  config, params = checkpoints.load(path)
  legacy = tmp_path / "copied" / "checkpoint_7"
  t5x_legacy.write_t5x_legacy(str(legacy), flatten(params), 7, inline_max_bytes=1000)
  spec_tree = serialization.msgpack_restore((legacy / "checkpoint").read_bytes())
  spec = spec_tree["optimizer"]["target"]["token_embedder"]["embedding"]
  spec["kvstore"] = {"driver": "gcs", "bucket": "t5-data",
                     "path": "pretrained_models/x/checkpoint_7/target.token_embedder.embedding"}
  (legacy / "checkpoint").write_bytes(serialization.msgpack_serialize(spec_tree))
  model_dir = tmp_path / "model"
  checkpoints.save(str(model_dir), 7, checkpoints.load(str(legacy))[1], config, {"note": "x"})
  for where in (model_dir, model_dir / "checkpoint_7"):
    loaded = checkpoints.load_checkpoint(str(where))
    assert (loaded.config, loaded.step, loaded.metadata) == (config, 7, {"note": "x"})
    for name, value in flatten(params).items():
      np.testing.assert_array_equal(flatten(loaded.params)[name], value, err_msg=name)


def test_t5x_orbax_checkpoint_without_config(tmp_path):
  """A T5X-style Orbax checkpoint (only the `state` item, no config) loads with an inferred config."""
  config, params = checkpoints.load(str(FIXTURES / "test_t5_tiny.checkpoint_0"))
  with ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
      step_prefix="checkpoint")) as manager:
    manager.save(3, args=ocp.args.Composite(state=ocp.args.PyTreeSave(
        {"target": params, "state": {"step": np.int64(3)}})))
  loaded = checkpoints.load_checkpoint(str(tmp_path))
  assert (loaded.config, loaded.step, loaded.metadata) == (config, 3, None)
  np.testing.assert_array_equal(loaded.params["decoder"]["logits_dense"]["kernel"],
                                params["decoder"]["logits_dense"]["kernel"])
