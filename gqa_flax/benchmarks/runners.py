"""Timed greedy decoding, forced to a fixed output length: ours and HF transformers'.

Times exclude compilation and warm-up (one untimed call first); each call's result is
waited for (`block_until_ready`), so a time covers the whole batch: encoder, cache, and
`new_tokens` decode steps.
"""
import functools
import statistics
import sys
import time
from typing import Callable, List

import jax
import numpy as np

from gqa_flax import decoding
from gqa_flax.models import T5Config, Transformer

PyTree = dict
NEVER_EOS = -1  # No token id is -1, so greedy decoding never stops early.


def timed(fn: Callable[[], object], repeats: int, label: str = "") -> List[float]:
  """Calls `fn` once untimed (compile, warm up), then `repeats` times; -> seconds per call."""
  fn()
  seconds = []
  for i in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
    print(f"  {label} run {i + 1}/{repeats}: {seconds[-1]:.3f}s", file=sys.stderr, flush=True)
  return seconds


def median(seconds: List[float]) -> float:
  return statistics.median(seconds)


def _prefill(model: Transformer, params: PyTree, tokens: jax.Array, max_decode_length: int):
  """The encoder and the decode cache: what `greedy_decode` does before its first step."""
  encoded = model.apply({"params": params}, tokens, method=Transformer.encode)
  return decoding.init_decode_cache(model, params, encoded, tokens, max_decode_length)


def time_ours(config: T5Config, params: PyTree, inputs: np.ndarray, new_tokens: int,
              repeats: int, label: str = "ours") -> dict:
  """Seconds of `greedy_decode` for the batch `inputs` [batch, inputs_len], and of its
  prefill (encoder + cache) alone; step = (total - prefill) / new_tokens."""
  model = Transformer(config)
  params = jax.device_put(params)
  tokens = jax.device_put(np.asarray(inputs, np.int32))
  greedy = lambda: decoding.greedy_decode(model, params, tokens, max_decode_length=new_tokens,
                                          eos_id=NEVER_EOS).block_until_ready()
  prefill_fn = jax.jit(functools.partial(_prefill, model), static_argnums=2)
  prefill = lambda: jax.block_until_ready(prefill_fn(params, tokens, new_tokens))
  total = median(timed(greedy, repeats, f"{label} greedy"))
  prefill_s = median(timed(prefill, repeats, f"{label} prefill"))
  return {"total_s": total, "prefill_s": prefill_s,
          "step_s": max(total - prefill_s, 0.0) / new_tokens}


def time_hf(hf_model, inputs: np.ndarray, new_tokens: int, repeats: int,
            label: str = "HF") -> dict:
  """Seconds of HF `generate()` (greedy, KV cache, exactly `new_tokens` new tokens) and of
  its encoder alone."""
  import torch
  ids = torch.tensor(np.asarray(inputs), dtype=torch.long)
  mask = ids > 0

  def generate():
    with torch.inference_mode():
      out = hf_model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                              min_new_tokens=new_tokens, max_new_tokens=new_tokens,
                              use_cache=True)
    assert out.shape[1] == new_tokens + 1, out.shape  # the start token + new_tokens

  def encode():
    with torch.inference_mode():
      hf_model.get_encoder()(input_ids=ids, attention_mask=mask)

  total = median(timed(generate, repeats, f"{label} generate"))
  prefill_s = median(timed(encode, repeats, f"{label} encoder"))
  return {"total_s": total, "prefill_s": prefill_s,
          "step_s": max(total - prefill_s, 0.0) / new_tokens}
