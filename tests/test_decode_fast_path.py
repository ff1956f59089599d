"""The fast decode path: same tokens as the uncached reference, caches updated in place,
and the benchmark's bytes model counting what the model really holds."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from gqa_flax import decoding
from gqa_flax.benchmarks import bytes_model, models, runners
from gqa_flax import kernels
from gqa_flax.models import Transformer, t5_1_1_config

VOCAB, HEADS = 40, 4


def _config(**overrides):
  return t5_1_1_config("tiny", dtype="float32", vocab_size=VOCAB, num_heads=HEADS, **overrides)


@functools.partial(jax.jit, static_argnums=0)
def _init(model, inputs):
  return nn.meta.unbox(model.init(jax.random.PRNGKey(0), inputs, inputs[:, :3])["params"])


def _inputs():
  inputs = np.random.RandomState(0).randint(2, VOCAB, (3, 11))
  inputs[2, 7:] = 0  # padding
  return jnp.asarray(inputs)


def _uncached_greedy(model, params, inputs, length):
  """Argmax of the teacher-forced model (no cache) over the growing prefix, never stopping."""
  logits_fn = jax.jit(lambda p, d: model.apply({"params": p}, inputs, d, jnp.ones_like(d)))
  tokens = np.zeros((inputs.shape[0], length), np.int32)
  for t in range(length):
    logits = logits_fn(params, jnp.asarray(np.pad(tokens[:, :-1], ((0, 0), (1, 0)))))
    tokens[:, t] = np.argmax(logits[:, t], -1)
  return tokens


def _cpu_kernels(enabled):
  if enabled and not kernels.available():
    pytest.skip("no CPU kernels here (not the CPU backend, or no C++ compiler)")
  return enabled


@pytest.mark.parametrize("cpu_kernels", [False, True], ids=["xla", "cpu_kernels"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
def test_forced_length_greedy_matches_uncached_reference(kv_heads, cpu_kernels):
  """GQA params mean-pooled from a multi-head model, as the benchmark makes them; 24 steps
  reach past the exact relative-position buckets. head_dim 32: one the CPU kernels take."""
  config = _config(head_dim=32)
  params = _init(Transformer(config), _inputs())
  config, params = models.with_kv_heads(config, params, kv_heads)
  model = Transformer(config)
  got = decoding.greedy_decode(model, params, _inputs(), max_decode_length=24,
                               eos_id=runners.NEVER_EOS, cpu_kernels=_cpu_kernels(cpu_kernels))
  expected = _uncached_greedy(model, params, _inputs(), 24)
  assert len(np.unique(expected)) > 3, expected  # not degenerate
  np.testing.assert_array_equal(got, expected)


def test_beam_search_with_cpu_kernels_matches_xla():
  config = _config(num_kv_heads=2, head_dim=32)
  model = Transformer(config)
  params = _init(model, _inputs())
  search = lambda kernels: decoding.beam_search(model, params, _inputs(), 12, beam_size=3,
                                                eos_id=runners.NEVER_EOS, cpu_kernels=kernels)
  tokens, scores = search(False)
  got_tokens, got_scores = search(_cpu_kernels(True))
  np.testing.assert_array_equal(got_tokens, tokens)
  np.testing.assert_allclose(got_scores, scores, rtol=1e-5)


def test_cpu_kernels_need_a_float32_model():
  model = Transformer(_config().replace(dtype="bfloat16"))
  params = _init(model, _inputs())
  with pytest.raises(ValueError, match="needs a float32 model"):
    decoding.greedy_decode(model, params, _inputs(), 4, cpu_kernels=True)


def _while_body_ops(hlo: str):
  """(op, element count) of every instruction reachable from the while loop's body."""
  computations, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if header:
      name = header.group(1)
      computations[name] = []
    elif name:
      computations[name].append(line)
  todo, seen = [re.search(r"body=%([\w.\-]+)", hlo).group(1)], set()
  while todo:
    name = todo.pop()
    if name not in seen:
      seen.add(name)
      todo += [c for line in computations[name]
               for c in re.findall(r"(?:calls|to_apply|body|condition)=%([\w.\-]+)", line)]
  for name in seen:
    for line in computations[name]:
      op = re.search(r"= \w+\[([\d,]*)\]\S* ([\w\-]+)\(", line)
      if op:
        yield op.group(2), int(np.prod([int(d) for d in op.group(1).split(",") if d]))


@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA-2", "MQA"])
def test_decode_loop_copies_no_cache(kv_heads):
  """The compiled loop body neither copies nor transposes any buffer as large as a cache:
  K/V are written in place and read in their stored (heads-major) layout."""
  config = _config(num_kv_heads=kv_heads, head_dim=16)
  model = Transformer(config)
  inputs = jax.ShapeDtypeStruct((4, 64), jnp.int32)
  params = jax.eval_shape(_init, model, jnp.ones((1, 4), jnp.int32))
  hlo = decoding.greedy_decode.lower(model, params, inputs, 32, -1).compile().as_text()
  smallest_cache = 4 * kv_heads * 32 * 16  # [batch, (kv_heads,) max_decode_length, head_dim]
  ops = list(_while_body_ops(hlo))
  assert any(op == "dot" for op, _ in ops)
  big = [(op, n) for op, n in ops if op in ("copy", "transpose") and n >= smallest_cache]
  assert not big, big


def test_bytes_model_counts_the_decoder_params_and_caches():
  config = _config(num_kv_heads=2)
  model = Transformer(config)
  batch, inputs_len, length = 3, 11, 20
  params = jax.eval_shape(_init, model, jnp.ones((1, 4), jnp.int32))
  decoder_params = sum(x.size for x in jax.tree_util.tree_leaves(params["decoder"]))
  assert bytes_model.decoder_param_count(config) == decoder_params
  encoded = jax.ShapeDtypeStruct((batch, inputs_len, config.emb_dim), jnp.float32)
  cache = jax.eval_shape(functools.partial(decoding.init_decode_cache, model,
                                           max_decode_length=length),
                         params, encoded, jnp.ones((batch, inputs_len), jnp.int32))
  leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
  nbytes = lambda kind: sum(x.size * x.dtype.itemsize for path, x in leaves
                            if kind in jax.tree_util.keystr(path))
  counted = bytes_model.step_bytes(config, batch, inputs_len, length)
  assert counted.self_cache == nbytes("'self_attention'")
  assert counted.cross_kv == nbytes("'encoder_decoder_attention'")
  assert counted.params == 4 * (decoder_params + batch * config.emb_dim)
