"""GQA conversion: methods against numpy, the real T5X fixture, HF source, CLI errors."""
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from flax.linen import meta

from gqa_flax import checkpoints
from gqa_flax.checkpoints import arrays, orbax_format, t5x_legacy
from gqa_flax.checkpoints.arrays import flatten
from gqa_flax.checkpoints.convert import (convert_arrays, convert_checkpoint, first_head_kv,
                                          kv_head_cosines, kv_head_similarity, mean_pool_kv,
                                          random_kv)
from gqa_flax.checkpoints.reader import open_checkpoint
from gqa_flax.convert import main
from gqa_flax.decoding import greedy_decode
from gqa_flax.models import Transformer, t5_1_1_config
from test_checkpoints import hf_dir  # noqa: F401  (pytest fixture)

T5X_TINY = str(Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "t5x"
               / "test_t5_tiny.checkpoint_0")
KV_KERNELS = [f"decoder/layers_{i}/{kind}/{proj}/kernel" for i in range(2)
              for kind in ("self_attention", "encoder_decoder_attention") for proj in ("key", "value")]


def _heads(kernel, head_dim):
  """[emb, H*head_dim] -> list of H [emb, head_dim] slices, written with plain slicing."""
  return [kernel[:, h * head_dim:(h + 1) * head_dim] for h in range(kernel.shape[1] // head_dim)]


def _numpy_group_mean(kernel, groups, head_dim):
  heads = _heads(kernel, head_dim)
  size = len(heads) // groups
  return np.concatenate([sum(heads[g * size:(g + 1) * size]) / size for g in range(groups)], axis=1)


def _numpy_group_first(kernel, groups, head_dim):
  heads = _heads(kernel, head_dim)
  return np.concatenate(heads[::len(heads) // groups], axis=1)


def test_mean_and_first_against_numpy():
  kernel = np.random.default_rng(0).normal(size=(5, 8 * 3)).astype(np.float32)
  for groups in (1, 2, 4, 8):
    np.testing.assert_allclose(mean_pool_kv(kernel, groups, 3), _numpy_group_mean(kernel, groups, 3),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(first_head_kv(kernel, groups, 3),
                                  _numpy_group_first(kernel, groups, 3))
  np.testing.assert_array_equal(mean_pool_kv(kernel, 8, 3), kernel)


@pytest.fixture(scope="module")
def t5x_tiny():
  return flatten(checkpoints.load(T5X_TINY)[1])


@pytest.mark.parametrize("groups,cross,method", [(4, None, "mean"), (2, None, "mean"), (1, None, "mean"),
                                                 (2, 1, "first")])
def test_real_t5x_checkpoint_converts(tmp_path, t5x_tiny, groups, cross, method):
  dst = tmp_path / "gqa"
  assert main(["--src", T5X_TINY, "--dst", str(dst), "--num_kv_heads", str(groups),
               "--method", method] + (["--cross_num_kv_heads", str(cross)] if cross else [])) == 0
  loaded = checkpoints.load_checkpoint(str(dst))
  cross = groups if cross is None else cross
  assert (loaded.config.num_kv_heads, loaded.config.cross_num_kv_heads) == (groups, cross)
  assert loaded.metadata == {"source_path": T5X_TINY, "source_format": "t5x_legacy", "source_step": 0,
                             "method": method, "num_kv_heads": groups, "cross_num_kv_heads": cross,
                             "seed": 0}
  params = flatten(loaded.params)
  assert params.keys() == t5x_tiny.keys()
  reference = _numpy_group_mean if method == "mean" else _numpy_group_first
  for name, source in t5x_tiny.items():
    assert params[name].dtype == source.dtype, name
    if name in KV_KERNELS:
      g = groups if "self_attention" in name else cross
      np.testing.assert_allclose(params[name], reference(source, g, 3), rtol=1e-6, atol=1e-7)
    else:
      np.testing.assert_array_equal(params[name], source, err_msg=name)  # Bit for bit.
  if groups == 4:  # G = H reproduces the source exactly.
    for name in KV_KERNELS:
      np.testing.assert_array_equal(params[name], t5x_tiny[name])


def test_kv_head_similarity_of_the_real_t5x_checkpoint_against_numpy(t5x_tiny):
  half = 1 / np.sqrt(2)  # heads [1, 0], [0, 1], [1, 1] (emb 2, head_dim 1)
  np.testing.assert_allclose(kv_head_cosines(np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]), 1),
                             [[1, 0, half], [0, 1, half], [half, half, 1]])
  similarity = kv_head_similarity(open_checkpoint(T5X_TINY))
  assert set(similarity) == set(KV_KERNELS)
  for name in KV_KERNELS:
    heads = [head.ravel() for head in _heads(t5x_tiny[name], 3)]
    expected = np.mean([a @ b / np.linalg.norm(a) / np.linalg.norm(b)
                        for i, a in enumerate(heads) for j, b in enumerate(heads) if i != j])
    assert similarity[name] == pytest.approx(expected, abs=1e-6), name  # a float32 reference


def test_random_uses_model_initializer_with_seed(tmp_path, t5x_tiny):
  convert_checkpoint(T5X_TINY, str(tmp_path / "random"), 2, method="random", seed=3, progress=False)
  params = flatten(checkpoints.load(str(tmp_path / "random"))[1])
  config = t5_1_1_config("tiny", vocab_size=32128)
  for name in KV_KERNELS:
    assert params[name].shape == (8, 6)
    np.testing.assert_array_equal(params[name], random_kv(name, config, 2, seed=3))
    assert not np.allclose(params[name], mean_pool_kv(t5x_tiny[name], 2, 3))
  assert not np.allclose(params[KV_KERNELS[0]], random_kv(KV_KERNELS[0], config, 2, seed=4))
  assert not np.allclose(params[KV_KERNELS[0]], params[KV_KERNELS[1]])  # Own draw per array.
  # variance_scaling(1.0, 'fan_in', 'normal'): std 1/sqrt(emb), over all 8 kernels [8, 6].
  assert 0.7 / np.sqrt(8) < np.std([params[name] for name in KV_KERNELS]) < 1.3 / np.sqrt(8)


def test_converted_model_runs_and_decodes(tmp_path):
  dst = tmp_path / "mqa"
  convert_checkpoint(T5X_TINY, str(dst), 1, dtype="float32", progress=False)
  config, params = checkpoints.load(str(dst))
  config = config.replace(dtype="float32")
  model = Transformer(config)
  inputs = jnp.array([[5, 17, 300, 9, 1, 0]])
  logits = model.apply({"params": params}, inputs, jnp.array([[0, 4, 8]]), jnp.array([[4, 8, 1]]))
  assert logits.shape == (1, 3, 32128) and np.isfinite(np.asarray(logits)).all()


def _assert_decodes(path):
  """The converted model at `path` decodes greedily, agreeing with its teacher-forced argmax."""
  config, params = checkpoints.load(path)
  model = Transformer(config.replace(dtype="float32"))
  inputs = jnp.array([[5, 17, 30, 9, 1, 0]])
  tokens = np.asarray(greedy_decode(model, params, inputs, max_decode_length=4))
  assert tokens.shape == (1, 4) and ((0 <= tokens) & (tokens < config.vocab_size)).all()
  n = int(np.argmax(tokens[0] == 1)) + 1 if (tokens[0] == 1).any() else 4
  decoder_inputs = np.concatenate([[[0]], tokens[:, :n - 1]], axis=1)
  logits = model.apply({"params": params}, inputs, decoder_inputs, np.where(tokens[:, :n] > 0, tokens[:, :n], 1))
  np.testing.assert_array_equal(np.argmax(logits, -1), tokens[:, :n])


def test_mean_pooled_gqa_equals_mha_with_repeated_group_means():
  """GQA-G from mean pooling == MHA whose K/V heads are the group means repeated (same function)."""
  config = t5_1_1_config("tiny", dtype="float32", vocab_size=40, num_heads=4, head_dim=3)
  mha = meta.unbox(Transformer(config).init(jax.random.PRNGKey(1), jnp.ones((1, 4), jnp.int32),
                                           jnp.ones((1, 3), jnp.int32))["params"])
  mha = jax.tree.map(np.asarray, mha)
  gqa, repeated = flatten(mha), flatten(mha)
  for name in KV_KERNELS:
    gqa[name] = mean_pool_kv(mha_kernel := flatten(mha)[name], 2, 3)
    means = _heads(gqa[name], 3)
    repeated[name] = np.concatenate([means[h // 2] for h in range(4)], axis=1)
    assert repeated[name].shape == mha_kernel.shape
  unflat = lambda flat: checkpoints.arrays.unflatten(flat)
  inputs, targets = jnp.array([[3, 7, 9, 1]]), jnp.array([[5, 6, 1]])
  decoder_inputs = jnp.array([[0, 5, 6]])
  gqa_logits = Transformer(config.replace(num_kv_heads=2)).apply(
      {"params": unflat(gqa)}, inputs, decoder_inputs, targets)
  mha_logits = Transformer(config).apply({"params": unflat(repeated)}, inputs, decoder_inputs, targets)
  np.testing.assert_allclose(gqa_logits, mha_logits, rtol=1e-5, atol=1e-5)


def test_hf_directory_converts(tmp_path, hf_dir):  # noqa: F811
  path, state = hf_dir
  convert_checkpoint(path, str(tmp_path / "gqa"), 2, progress=False)
  loaded = checkpoints.load_checkpoint(str(tmp_path / "gqa"))
  assert loaded.metadata["source_format"] == "hf" and loaded.config.num_kv_heads == 2
  key = loaded.params["decoder"]["layers_2"]["self_attention"]["key"]["kernel"]
  np.testing.assert_allclose(key, _numpy_group_mean(state["decoder.block.2.layer.0.SelfAttention.k.weight"].T, 2, 3),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(loaded.params["encoder"]["layers_1"]["attention"]["key"]["kernel"],
                                state["encoder.block.1.layer.0.SelfAttention.k.weight"].T)
  _assert_decodes(str(tmp_path / "gqa"))


def _cli_error(capsys, *args):
  assert main(list(args)) == 1
  err = capsys.readouterr().err.strip().splitlines()[-1]  # After any progress bar.
  assert err.startswith("gqa-convert: error: ")
  return err


def test_bad_inputs_fail_cleanly_and_leave_no_dst(tmp_path, capsys, t5x_tiny):
  dst = tmp_path / "dst"
  assert "must be a positive divisor of num_heads=4" in _cli_error(
      capsys, "--src", T5X_TINY, "--dst", str(dst), "--num_kv_heads", "3")
  empty = tmp_path / "empty"
  empty.mkdir()
  assert "is not a recognised checkpoint" in _cli_error(
      capsys, "--src", str(empty), "--dst", str(dst), "--num_kv_heads", "2")
  missing = tmp_path / "missing" / "checkpoint_0"
  t5x_legacy.write_t5x_legacy(str(missing), {n: a for n, a in t5x_tiny.items() if n != KV_KERNELS[1]}, 0)
  assert f"missing arrays ['{KV_KERNELS[1]}']" in _cli_error(
      capsys, "--src", str(missing), "--dst", str(dst), "--num_kv_heads", "2")
  misshaped = tmp_path / "misshaped" / "checkpoint_0"
  # layers_0's key kernel is where the config is inferred from: still named, not an invalid G.
  for name, message in ((KV_KERNELS[6], f"{KV_KERNELS[6]} (8, 9) (expected (8, 12))"),
                        (KV_KERNELS[0], f"mis-shaped array {KV_KERNELS[0]} (8, 9)")):
    t5x_legacy.write_t5x_legacy(str(misshaped), {**t5x_tiny, name: t5x_tiny[name][:, :9]}, 0)
    assert message in _cli_error(capsys, "--src", str(misshaped), "--dst", str(dst),
                                 "--num_kv_heads", "2")
  assert not dst.exists()
  # Interrupted: an array's data vanishes after the checkpoint was opened -> no DST, no temp.
  broken = tmp_path / "broken" / "checkpoint_0"
  t5x_legacy.write_t5x_legacy(str(broken), t5x_tiny, 0)
  for zarr_dir in broken.glob("target.decoder.logits_dense.kernel"):
    for chunk in zarr_dir.iterdir():
      chunk.unlink()
    zarr_dir.rmdir()
  _cli_error(capsys, "--src", str(broken), "--dst", str(dst), "--num_kv_heads", "2")
  assert sorted(os.listdir(tmp_path)) == ["broken", "empty", "misshaped", "missing"]
  # DST exists: refused, untouched; --overwrite replaces it.
  dst.mkdir()
  (dst / "keep").write_text("x")
  assert "exists; pass --overwrite" in _cli_error(
      capsys, "--src", T5X_TINY, "--dst", str(dst), "--num_kv_heads", "2")
  assert os.listdir(dst) == ["keep"]
  handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  assert main(["--src", T5X_TINY, "--dst", str(dst), "--num_kv_heads", "2", "--overwrite"]) == 0
  assert checkpoints.load(str(dst))[0].num_kv_heads == 2
  # main() called in a process that goes on gives back Ctrl-C's and SIGTERM's handlers.
  assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_module_cli_exit_code(tmp_path):
  (tmp_path / "empty").mkdir()
  result = subprocess.run([sys.executable, "-m", "gqa_flax.convert", "--src", str(tmp_path / "empty"),
                           "--dst", str(tmp_path / "out"), "--num_kv_heads", "1"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
  assert result.returncode == 1
  assert "is not a recognised checkpoint" in result.stderr.strip().splitlines()[-1]


def test_large_arrays_stream_in_row_blocks(tmp_path, t5x_tiny, monkeypatch):
  """No array that can be read in blocks is read whole; DST's large arrays are chunked in row
  bands (64 KiB blocks here: the [32128, 8] embedding in 16); values are those of numpy."""
  monkeypatch.setattr(arrays, "BLOCK_BYTES", 2**16)
  src = tmp_path / "src" / "checkpoint_0"
  t5x_legacy.write_t5x_legacy(str(src), t5x_tiny, 0, inline_max_bytes=0)
  source = checkpoints.open_checkpoint(str(src))
  streamed = {name: array for name, array in source.arrays.items() if array.read_blocks}
  assert len(streamed) == len(t5x_tiny)

  def never(name):
    def read():
      raise AssertionError(f"{name} was read whole")
    return read

  source.arrays = {name: dataclasses.replace(array, read=never(name))
                   for name, array in streamed.items()}
  config, converted, _ = convert_arrays(source, 2, method="mean")
  orbax_format.save(str(tmp_path / "gqa"), 0, arrays.unflatten(converted), config)
  params = flatten(checkpoints.load(str(tmp_path / "gqa"))[1])
  for name, value in t5x_tiny.items():
    expected = mean_pool_kv(value, 2, 3) if name in KV_KERNELS else value
    np.testing.assert_array_equal(params[name], expected, err_msg=name)
  embedding = ts.open({"driver": "zarr", "kvstore": {
      "driver": "ocdbt", "base": f"file://{tmp_path}/gqa/checkpoint_0/state",
      "path": "target.token_embedder.embedding"}}).result()
  assert embedding.chunk_layout.read_chunk.shape == (2048, 8)


def test_tensorstore_partial_reads_of_chunked_zarr(tmp_path, monkeypatch):
  """A zarr array of many chunks is read in bands of whole chunk rows, then rebatched."""
  monkeypatch.setattr(arrays, "BLOCK_BYTES", 3 * 7 * 4)  # 3 rows; chunks have 4.
  value = np.arange(10 * 7, dtype=np.float32).reshape(10, 7)
  spec = {"driver": "zarr", "dtype": "float32", "kvstore": {"driver": "file", "path": "x"},
          "metadata": {"chunks": [4, 5], "compressor": {"id": "gzip"}, "shape": [10, 7]}}
  ts.open(dict(spec, kvstore={"driver": "file", "path": str(tmp_path / "x")}),
          create=True).result().write(value).result()
  array = t5x_legacy._zarr_array(spec, str(tmp_path))
  assert [len(block) for block in array.read_blocks()] == [4, 4, 2]
  blocks = list(array.blocks(3))
  assert [len(block) for block in blocks] == [3, 3, 3, 1]
  np.testing.assert_array_equal(np.concatenate(blocks), value)
