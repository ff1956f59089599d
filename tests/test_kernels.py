"""The hand-written CPU kernels against numpy (float64) references."""
import shutil

import jax
import numpy as np
import pytest

from gqa_flax.kernels import build, decode_attention, panel_matmul

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="no C++ compiler")


@pytest.mark.parametrize("kernel", [panel_matmul, decode_attention])
def test_kernel_builds_and_registers(kernel):
  """Fails with the compiler's message, rather than falling back to XLA's ops unnoticed."""
  assert build.build(kernel._SOURCE).exists()
  assert kernel.available()


def test_pack_panels_layout():
  kernel = np.arange(3 * 70, dtype=np.float32).reshape(3, 70)
  panels = np.asarray(panel_matmul.pack_panels(kernel))
  assert panels.shape == (3, 3, 32)  # ceil(70 / 32) panels
  np.testing.assert_array_equal(panels[1], kernel[:, 32:64])
  np.testing.assert_array_equal(panels[2, :, :6], kernel[:, 64:])
  assert not panels[2, :, 6:].any()


# Rows: one block of 8, partial blocks, several blocks; columns: whole and partial panels;
# 32128 columns: T5.1.1's vocabulary, spread over the threads.
@pytest.mark.parametrize("m,k,n", [(1, 7, 1), (3, 33, 31), (8, 512, 384), (9, 64, 100),
                                   (17, 128, 65), (8, 64, 32128)])
def test_panel_matmul_matches_numpy(m, k, n):
  rng = np.random.default_rng(m * k + n)
  x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
  got = jax.jit(lambda x, w: panel_matmul.panel_matmul(x, panel_matmul.pack_panels(w), n))(x, w)
  assert got.shape == (m, n)
  np.testing.assert_allclose(got, x.astype(np.float64) @ w, rtol=0, atol=2e-5 * np.sqrt(k))


def _numpy_attention(query, key, value, bias):
  """float64 softmax attention; query [b, 1, heads, d], key/value [b, kv_heads, t, d]."""
  group = query.shape[2] // key.shape[1]
  key, value = (np.repeat(x.astype(np.float64), group, axis=1) for x in (key, value))
  logits = np.einsum("bqhd,bhtd->bhqt", query.astype(np.float64), key) + bias
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqt,bhtd->bqhd", weights, value)


# MHA, GQA and MQA; 8 query heads per K/V head (two register blocks: 6 + 2); kv_len not a
# multiple of 16 (the softmax's tail); a per-sequence padding mask and a per-head bias.
@pytest.mark.parametrize("heads,kv_heads,head_dim,kv_len", [
    (4, 4, 16, 37), (6, 2, 64, 50), (6, 1, 64, 16), (8, 1, 32, 45)])
def test_decode_attention_matches_numpy(heads, kv_heads, head_dim, kv_len):
  rng = np.random.default_rng(heads * kv_len + head_dim)
  batch = 3
  query = rng.standard_normal((batch, 1, heads, head_dim), np.float32)
  key, value = (rng.standard_normal((batch, kv_heads, kv_len, head_dim), np.float32)
                for _ in range(2))
  padding = np.where(np.arange(kv_len) < kv_len - 5 * np.arange(batch)[:, None], 0.0, -1e10)
  bias = (padding[:, None, None, :]
          + rng.standard_normal((1, heads, 1, kv_len))).astype(np.float32)
  got = jax.jit(decode_attention.decode_attention)(query, key, value, bias)
  np.testing.assert_allclose(got, _numpy_attention(query, key, value, bias), rtol=0, atol=2e-5)
