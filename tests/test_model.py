"""The T5.1.1 model with grouped-query decoder attention: exactness, caching, decoding."""
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gqa_flax import decoding
from gqa_flax.models import Transformer, grouped_dot_product_attention, t5_1_1_config

VOCAB = 50


def _model(num_kv_heads=None, **overrides):
  overrides = {"vocab_size": VOCAB, **overrides}
  config = t5_1_1_config("tiny", dtype="float32", num_kv_heads=num_kv_heads, **overrides)
  return Transformer(config)


def _batch(targets_len=40, seed=0):
  """Encoder inputs with padding in row 1, and shifted decoder inputs."""
  rng = np.random.RandomState(seed)
  inputs = rng.randint(2, VOCAB, (2, 9))
  inputs[1, 6:] = 0
  targets = rng.randint(2, VOCAB, (2, targets_len))
  decoder_inputs = np.pad(targets[:, :-1], ((0, 0), (1, 0)))
  return jnp.asarray(inputs), jnp.asarray(decoder_inputs), jnp.asarray(targets)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model, batch, seed):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), *batch)["params"])


def _init(model, batch, seed=1):
  return _init_params(model, tuple(map(jnp.asarray, batch)), seed)


@functools.partial(jax.jit, static_argnums=0)
def _logits(model, params, *batch):
  """Teacher-forced logits [batch, targets_len, vocab]."""
  return model.apply({"params": params}, *batch)


def _numpy_attention(query, key, value, bias):
  """Multi-head attention in numpy with each K/V head repeated to its group of query heads."""
  heads, kv_heads = query.shape[2], key.shape[2]
  key = np.repeat(key, heads // kv_heads, axis=2)
  value = np.repeat(value, heads // kv_heads, axis=2)
  logits = np.einsum("bqhd,bkhd->bhqk", query, key) + bias
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, value)


@pytest.mark.parametrize("kv_heads", [6, 3, 2, 1])
def test_grouped_attention_matches_numpy_multi_head_reference(kv_heads):
  rng = np.random.RandomState(kv_heads)
  query = rng.randn(2, 5, 6, 4).astype(np.float32)
  key, value = rng.randn(2, 2, 7, kv_heads, 4).astype(np.float32)
  bias = rng.randn(1, 6, 5, 7).astype(np.float32)
  got = grouped_dot_product_attention(*map(jnp.asarray, (query, key, value, bias)))
  np.testing.assert_allclose(got, _numpy_attention(query, key, value, bias), atol=1e-6)


def test_gqa_h_is_mha():
  batch = _batch()
  mha, gqa_h = _model(), _model(num_kv_heads=4)
  params = _init(mha, batch)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(_init(gqa_h, batch))
  np.testing.assert_allclose(_logits(gqa_h, params, *batch), _logits(mha, params, *batch),
                             atol=1e-6, rtol=0)


def test_gqa_equals_mha_with_group_shared_kv_heads():
  """GQA-2 == MHA whose K/V heads are copies of the GQA heads (query h -> kv head h // 2)."""
  batch = _batch()
  gqa = _model(num_kv_heads=2)
  params = _init(gqa, batch)
  mha_params = jax.tree_util.tree_map(lambda x: x, params)
  for layer in range(2):
    for kind in ("self_attention", "encoder_decoder_attention"):
      for proj in ("key", "value"):
        kernel = params["decoder"][f"layers_{layer}"][kind][proj]["kernel"]  # [emb, 2*3]
        repeated = jnp.repeat(kernel.reshape(8, 2, 3), 2, axis=1).reshape(8, 12)
        mha_params["decoder"][f"layers_{layer}"][kind][proj]["kernel"] = repeated
  np.testing.assert_allclose(_logits(gqa, params, *batch), _logits(_model(), mha_params, *batch),
                             atol=1e-6)


def test_kv_heads_must_divide_heads():
  with pytest.raises(ValueError, match=r"num_kv_heads=3 .*num_heads=4"):
    _model(num_kv_heads=3)
  with pytest.raises(ValueError, match=r"cross_num_kv_heads=3 .*num_heads=4"):
    _model(cross_num_kv_heads=3)


def test_param_tree_is_t5x():
  model = _model(num_kv_heads=1)
  boxed = model.init(jax.random.PRNGKey(0), *_batch(4))["params"]
  flat = {"/".join(k.key for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}
  assert flat["decoder/layers_1/self_attention/key/kernel"].value.shape == (8, 3)
  assert flat["decoder/layers_1/encoder_decoder_attention/value/kernel"].value.shape == (8, 3)
  assert flat["encoder/layers_0/attention/key/kernel"].value.shape == (8, 12)
  assert flat["decoder/layers_0/self_attention/out/kernel"].names == ("joined_kv", "embed")
  assert flat["token_embedder/embedding"].names == ("vocab", "embed")
  assert flat["decoder/logits_dense/kernel"].value.shape == (8, VOCAB)
  assert flat["decoder/relpos_bias/rel_embedding"].names == ("heads", "relpos_buckets")
  assert len(flat) == 1 + (2 + 2 * 9) + (3 + 2 * 14) and all(leaf.names for leaf in flat.values())


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
def test_cached_decoding_equals_teacher_forcing(kv_heads):
  """40 target tokens: past the exact buckets (16) into the log-spaced ones."""
  model = _model(num_kv_heads=kv_heads)
  batch = _batch(targets_len=40)
  params = _init(model, batch)
  inputs, decoder_inputs, _ = batch
  expected = _logits(model, params, *batch)
  encoded = model.apply({"params": params}, inputs, method=Transformer.encode)
  cache = decoding.init_decode_cache(model, params, encoded, inputs, 40)
  step = jax.jit(decoding.decode_step, static_argnums=(0, 6))
  steps = []
  for i in range(40):
    logits, cache = step(model, params, cache, encoded, inputs, decoder_inputs[:, i], 40)
    steps.append(logits)
  np.testing.assert_allclose(jnp.stack(steps, axis=1), expected, atol=1e-5, rtol=0)


def _cache_bytes(cache, kind):
  leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
  return sum(x.size * x.dtype.itemsize for path, x in leaves
             if kind in jax.tree_util.keystr(path) and x.ndim >= 3)  # K/V, not cache_index


def test_cache_bytes_scale_with_kv_heads():
  config = dict(num_heads=8, head_dim=4, emb_dim=16)
  inputs = jnp.ones((3, 11), jnp.int32)
  sizes = {}
  for kv in (8, 4, 2, 1):
    model = _model(num_kv_heads=kv, **config)
    params = jax.eval_shape(functools.partial(_init, model), (inputs, inputs[:, :5], inputs[:, :5]))
    encoded = jax.ShapeDtypeStruct((3, 11, 16), jnp.float32)
    cache = jax.eval_shape(functools.partial(decoding.init_decode_cache, model, max_decode_length=20),
                           params, encoded, inputs)
    sizes[kv] = (_cache_bytes(cache, "'self_attention'"),
                 _cache_bytes(cache, "'encoder_decoder_attention'"))
    assert sizes[kv][0] == 2 * 2 * 3 * 20 * kv * 4 * 4  # layers x (K,V) x [3, 20, kv, 4] f32
    assert sizes[kv][1] == 2 * 2 * 3 * 11 * kv * 4 * 4
  for kv in (4, 2, 1):
    assert sizes[kv][0] * 8 == sizes[8][0] * kv and sizes[kv][1] * 8 == sizes[8][1] * kv


def test_tiny_model_compiles_and_decodes_a_batch():
  model = Transformer(t5_1_1_config("tiny", dtype="float32"))  # full 32128 vocabulary
  inputs = jnp.asarray(np.random.RandomState(0).randint(2, 32128, (8, 32)))
  params = _init(model, (inputs, inputs[:, :4], inputs[:, :4]))
  start = time.perf_counter()
  tokens = np.asarray(decoding.greedy_decode(model, params, inputs, max_decode_length=16))
  seconds = time.perf_counter() - start
  assert tokens.shape == (8, 16) and tokens.min() >= 0 and tokens.max() < 32128
  assert seconds < 60, f"compiling and decoding the tiny model took {seconds:.1f}s"


def _greedy_reference(model, params, inputs, length):
  """Greedy by re-running the teacher-forced model on the growing prefix (no cache).

  The causal mask makes position t's logits depend only on decoder inputs <= t, so the
  prefix can sit in a fixed-length buffer.
  """
  tokens = np.zeros((inputs.shape[0], length), np.int32)
  for t in range(length):
    decoder_inputs = np.pad(tokens[:, :-1], ((0, 0), (1, 0)))
    logits = _logits(model, params, inputs, decoder_inputs, np.ones_like(decoder_inputs))
    tokens[:, t] = np.argmax(logits[:, t], -1)
  done = np.cumsum(tokens == 1, axis=1) - (tokens == 1) > 0  # positions after the first EOS
  return np.where(done, 0, tokens)


@pytest.mark.parametrize("kv_heads", [4, 1])
def test_greedy_decode_matches_uncached_reference(kv_heads):
  model = _model(num_kv_heads=kv_heads)
  inputs = _batch()[0]
  params = _init(model, _batch(8))
  got = decoding.greedy_decode(model, params, inputs, max_decode_length=12)
  np.testing.assert_array_equal(got, _greedy_reference(model, params, inputs, 12))


def test_beam_search_finds_the_exhaustive_best():
  """With a 5-token vocabulary and 3 steps, beams >= all prefixes make the search exact.

  As in T5X, finished (EOS-terminated) sequences are returned when there are any.
  """
  model = _model(num_kv_heads=2, vocab_size=5)
  inputs = jnp.asarray([[3, 4, 2, 0], [2, 2, 3, 4]])
  params = _init(model, (inputs, inputs[:, :3], inputs[:, :3]))
  params = jax.tree_util.tree_map(lambda x: 4 * x, params)  # sharper distributions
  alpha, length = 0.6, 3
  tokens, scores = decoding.beam_search(model, params, inputs, length, beam_size=25, alpha=alpha)
  # Every EOS-terminated sequence of at most `length` tokens, zero-padded.
  seqs = sorted({seq[:seq.index(1) + 1] + (0,) * (length - seq.index(1) - 1)
                 for seq in itertools.product(range(5), repeat=length) if 1 in seq})
  seqs = np.array(seqs)
  ends = np.argmax(seqs == 1, axis=1) + 1
  decoder_inputs = np.pad(seqs[:, :-1], ((0, 0), (1, 0)))
  for b in range(2):
    batch_inputs = np.repeat(inputs[b:b + 1], len(seqs), axis=0)
    logp = jax.nn.log_softmax(_logits(model, params, batch_inputs, decoder_inputs,
                                      np.ones_like(decoder_inputs)))
    token_logp = np.take_along_axis(np.asarray(logp), seqs[:, :, None], axis=2)[:, :, 0]
    summed = np.where(np.arange(length) < ends[:, None], token_logp, 0).sum(axis=1)
    reference = summed / ((5 + ends) / 6) ** alpha
    np.testing.assert_array_equal(tokens[b, 0], seqs[np.argmax(reference)])
    np.testing.assert_allclose(scores[b, 0], reference.max(), rtol=1e-5)
