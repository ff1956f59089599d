"""Autoregressive decoding from the cache: greedy (the paper's) and beam search (T5X's).

Both are one jit-compiled `lax.while_loop`: the encoder runs once, the cache is created once
(self-attention K/V zeros `[batch, kv_heads, max_decode_length, head_dim]`, cross-attention
K/V projected from the encoder output), then each step feeds one token per sequence and
updates the cache in place (the loop carry), with no host round trip until the end. The
loop stops when every sequence has produced EOS or after `max_decode_length` tokens.

With `cpu_kernels=True` (CPU backend, float32 model) the decoder's kernels are packed once,
before the loop, into column panels, and each step runs on the hand-written kernels of
`gqa_flax.kernels` (dense products from the panels, attention over the caches);
`gqa_flax.kernels.available()` says whether they can run here.

`shardings` (a `DecodeShardings`, e.g. the training `Partitioner`) pins the cache's layout on
a mesh, at creation and in the loop carry, and may split an attention's batch over the mesh
(Pope et al. 2022's batch-partitioned multi-query attention: each device reads the K/V of its
own rows only); `training.predictor` passes it.
"""
import contextlib
import functools
from typing import Optional, Protocol, Tuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import traverse_util

from gqa_flax import errors
from gqa_flax.kernels import panel_matmul, plugin
from gqa_flax.models import Transformer
from gqa_flax.models.attention import MultiHeadDotProductAttention

PyTree = dict


class DecodeShardings(Protocol):
  """Where a decode's cache and attention live on a mesh (`Partitioner` is one)."""

  def cache_shardings(self, cache: PyTree) -> PyTree:
    """The cache's NamedShardings."""

  def attention_shardings(self, kv_heads: int, heads: int, batch: int) -> Optional[tuple]:
    """(query/key/value sharding, output sharding) of an attention, or None: XLA's choice."""


def _constrained(cache: PyTree, shardings: Optional[DecodeShardings]) -> PyTree:
  if shardings is None:
    return cache
  return jax.lax.with_sharding_constraint(cache, shardings.cache_shardings(cache))


def _attention_in(shardings: Optional[DecodeShardings]):
  """The context in which each attention runs in `shardings.attention_shardings`."""
  if shardings is None:
    return contextlib.nullcontext()

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if not (isinstance(module, MultiHeadDotProductAttention) and context.method_name == "attend"):
      return next_fun(*args, **kwargs)
    query, key, value, *rest = args
    attention = shardings.attention_shardings(module.num_kv_heads, module.num_heads,
                                              query.shape[0])
    if attention is None:
      return next_fun(*args, **kwargs)
    inputs, output = attention
    query, key, value = (jax.lax.with_sharding_constraint(x, inputs) for x in (query, key, value))
    return jax.lax.with_sharding_constraint(next_fun(query, key, value, *rest, **kwargs), output)

  return nn.intercept_methods(intercept)


def init_decode_cache(model: Transformer, params: PyTree, encoded: jax.Array,
                      encoder_input_tokens: jax.Array, max_decode_length: int,
                      shardings: Optional[DecodeShardings] = None) -> PyTree:
  """The decode cache for `encoded` [batch, inputs_len, emb]: K/V computed once here."""
  bos = jnp.zeros((encoded.shape[0], 1), jnp.int32)
  with _attention_in(shardings):
    _, variables = model.apply({"params": params}, encoded, encoder_input_tokens, bos,
                               decode=True, max_decode_length=max_decode_length,
                               method=Transformer.decode, mutable=["cache"])
  return variables["cache"]


def prefill(model: Transformer, params: PyTree, encoder_input_tokens: jax.Array,
            max_decode_length: int, shardings: Optional[DecodeShardings] = None
            ) -> Tuple[jax.Array, PyTree]:
  """encoder_input_tokens [batch, inputs_len] -> (encoded [batch, inputs_len, emb], the decode
  cache), the cache in `shardings` when given."""
  encoded = model.apply({"params": params}, encoder_input_tokens, method=Transformer.encode)
  cache = init_decode_cache(model, params, encoded, encoder_input_tokens, max_decode_length,
                            shardings)
  return encoded, _constrained(cache, shardings)


def kernel_panels(params: PyTree) -> PyTree:
  """What `decode_step` needs to run on the CPU kernels: every decoder kernel [k, n] as panels
  [ceil(n/32), k, 32], except cross-attention's key/value (the step reads their cache)."""
  cross_kv = {("encoder_decoder_attention", "key"), ("encoder_decoder_attention", "value")}
  flat = traverse_util.flatten_dict(params["decoder"])
  packed = {path: panel_matmul.pack_panels(kernel) for path, kernel in flat.items()
            if path[-1] == "kernel" and path[-3:-1] not in cross_kv}
  return {"decoder": traverse_util.unflatten_dict(packed)}


def _panels_if(model: Transformer, params: PyTree, cpu_kernels: bool) -> Optional[PyTree]:
  """`kernel_panels(params)` if `cpu_kernels` (float32 models only), else None."""
  if not cpu_kernels:
    return None
  if jnp.dtype(model.config.dtype) != jnp.float32:
    raise errors.UserError(
        f"cpu_kernels=True needs a float32 model, got dtype={model.config.dtype}; "
        "pass cpu_kernels=False")
  return kernel_panels(params)


def decode_step(model: Transformer, params: PyTree, cache: PyTree, encoded: jax.Array,
                encoder_input_tokens: jax.Array, tokens: jax.Array, max_decode_length: int,
                panels: Optional[PyTree] = None, shardings: Optional[DecodeShardings] = None
                ) -> Tuple[jax.Array, PyTree]:
  """tokens [batch] at the cache's position -> (logits [batch, vocab] float32, new cache).

  With `panels` (`kernel_panels(params)`) the step runs on the CPU kernels; with `shardings`
  its attention runs in their layout."""
  variables = {"params": params, "cache": cache}
  if panels is None:
    kernels = contextlib.nullcontext()
  else:
    variables[plugin.KERNEL_PANELS] = panels
    kernels = plugin.on_cpu_kernels()
  with kernels, _attention_in(shardings):
    logits, variables = model.apply(variables, encoded, encoder_input_tokens, tokens[:, None],
                                    decode=True, max_decode_length=max_decode_length,
                                    method=Transformer.decode, mutable=["cache"])
  return logits[:, -1], variables["cache"]


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "eos_id",
                                             "cpu_kernels", "shardings"))
def greedy_decode(model: Transformer, params: PyTree, encoder_input_tokens: jax.Array,
                  max_decode_length: int, eos_id: int = 1, cpu_kernels: bool = False,
                  shardings: Optional[DecodeShardings] = None) -> jax.Array:
  """encoder_input_tokens [batch, inputs_len] -> tokens [batch, max_decode_length].

  Each sequence's tokens after its EOS are 0 (padding), as in T5X.
  """
  batch = encoder_input_tokens.shape[0]
  encoded, cache = prefill(model, params, encoder_input_tokens, max_decode_length, shardings)
  panels = _panels_if(model, params, cpu_kernels)

  def body(state):
    i, cache, token, out, done = state
    logits, cache = decode_step(model, params, cache, encoded, encoder_input_tokens, token,
                                max_decode_length, panels, shardings)
    cache = _constrained(cache, shardings)
    token = jnp.where(done, 0, jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return i + 1, cache, token, out.at[:, i].set(token), done | (token == eos_id)

  def cond(state):
    i, _, _, _, done = state
    return (i < max_decode_length) & ~jnp.all(done)

  state = (jnp.zeros((), jnp.int32), cache, jnp.zeros((batch,), jnp.int32),
           jnp.zeros((batch, max_decode_length), jnp.int32), jnp.zeros((batch,), bool))
  return jax.lax.while_loop(cond, body, state)[3]


def brevity_penalty(alpha: float, length: jax.Array) -> jax.Array:
  """T5X's length penalty ((5 + length) / 6) ** alpha."""
  return ((5.0 + length) / 6.0) ** alpha


def _gather_beams(tree: PyTree, beam_indices: jax.Array, batch: int, beams: int) -> PyTree:
  """Selects beams [batch, new_beams] from leaves [batch*beams, ...] or [batch, beams, ...]."""
  def gather(x):
    if x.ndim == 0:
      return x
    flat = x.shape[0] == batch * beams
    x = x.reshape((batch, beams) + x.shape[1:]) if flat else x
    idx = beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2))
    out = jnp.take_along_axis(x, idx, axis=1)
    return out.reshape((-1,) + out.shape[2:]) if flat else out
  return jax.tree_util.tree_map(gather, tree)


@functools.partial(jax.jit, static_argnames=("model", "max_decode_length", "beam_size", "eos_id",
                                             "cpu_kernels", "shardings"))
def beam_search(model: Transformer, params: PyTree, encoder_input_tokens: jax.Array,
                max_decode_length: int, beam_size: int = 4, alpha: float = 0.6,
                eos_id: int = 1, cpu_kernels: bool = False,
                shardings: Optional[DecodeShardings] = None) -> Tuple[jax.Array, jax.Array]:
  """T5X-style beam search with length penalty `alpha`.

  Returns (tokens [batch, beam_size, max_decode_length], scores [batch, beam_size]),
  best first; scores are log-probabilities divided by `brevity_penalty(alpha, length)`.
  """
  batch = encoder_input_tokens.shape[0]
  k = beam_size
  inputs = jnp.repeat(encoder_input_tokens, k, axis=0)  # [batch*beams, inputs_len]
  encoded, cache = prefill(model, params, inputs, max_decode_length, shardings)
  panels = _panels_if(model, params, cpu_kernels)
  neg_inf = jnp.array(-1e7, jnp.float32)

  def body(state):
    i, cache, live_seqs, live_logp, fin_seqs, fin_scores, fin_flags = state
    prev = jnp.where(i == 0, 0, live_seqs[:, :, jnp.maximum(i - 1, 0)]).reshape(-1)
    logits, cache = decode_step(model, params, cache, encoded, inputs, prev, max_decode_length,
                                panels, shardings)
    vocab = logits.shape[-1]
    logp = live_logp[:, :, None] + jax.nn.log_softmax(logits).reshape(batch, k, vocab)
    top_logp, top_ids = jax.lax.top_k(logp.reshape(batch, k * vocab), 2 * k)
    top_beams, top_tokens = top_ids // vocab, (top_ids % vocab).astype(jnp.int32)
    seqs = _gather_beams(live_seqs, top_beams, batch, k).at[:, :, i].set(top_tokens)
    is_eos = top_tokens == eos_id
    # Finished: merge the EOS candidates with the sequences finished before.
    cand_scores = jnp.where(is_eos, top_logp / brevity_penalty(alpha, i + 1.0), neg_inf)
    all_scores = jnp.concatenate([fin_scores, cand_scores], axis=1)
    all_seqs = jnp.concatenate([fin_seqs, seqs], axis=1)
    all_flags = jnp.concatenate([fin_flags, is_eos], axis=1)
    fin_scores, best = jax.lax.top_k(all_scores, k)
    fin_seqs, fin_flags = _gather_beams((all_seqs, all_flags), best, batch, 3 * k)
    # Live: the best k candidates that did not end.
    live_logp, best = jax.lax.top_k(jnp.where(is_eos, neg_inf, top_logp), k)
    live_seqs = _gather_beams(seqs, best, batch, 2 * k)
    cache = _gather_beams(cache, _gather_beams(top_beams, best, batch, 2 * k), batch, k)
    cache = _constrained(cache, shardings)
    return i + 1, cache, live_seqs, live_logp, fin_seqs, fin_scores, fin_flags

  def cond(state):
    i, _, _, live_logp, _, fin_scores, fin_flags = state
    best_live = live_logp[:, 0] / brevity_penalty(alpha, float(max_decode_length))
    worst_finished = jnp.where(fin_flags.all(axis=1), fin_scores.min(axis=1), neg_inf)
    return (i < max_decode_length) & ~jnp.all(best_live < worst_finished)

  seqs = jnp.zeros((batch, k, max_decode_length), jnp.int32)
  live_logp = jnp.tile(jnp.array([0.0] + [-1e7] * (k - 1), jnp.float32), (batch, 1))
  state = (jnp.zeros((), jnp.int32), cache, seqs, live_logp, seqs,
           jnp.full((batch, k), -1e7, jnp.float32), jnp.zeros((batch, k), bool))
  _, _, live_seqs, live_logp, fin_seqs, fin_scores, fin_flags = jax.lax.while_loop(cond, body, state)
  # A batch element with no finished sequence returns its live ones.
  any_finished = fin_flags.any(axis=1)[:, None]
  live_scores = live_logp / brevity_penalty(alpha, float(max_decode_length))
  tokens = jnp.where(any_finished[:, :, None], fin_seqs, live_seqs)
  return tokens, jnp.where(any_finished, fin_scores, live_scores)
