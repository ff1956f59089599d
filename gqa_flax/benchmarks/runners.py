"""Timed greedy decoding, forced to a fixed output length: ours and HF transformers'.

Each variant is a pair of calls: 'total' decodes the whole batch (encoder, cache and
`new_tokens` decode steps) and 'prefill' runs the encoder and fills the cache alone; each
call waits for its result (`block_until_ready`). `time_interleaved` times the variants in
rounds, one call of each per round, so a shared machine's drift in speed falls on every
variant alike instead of on whichever ran last.
"""
import statistics
import sys
import time
from typing import Callable, Dict, List

import jax
import numpy as np

from gqa_flax.models import T5Config
from gqa_flax.training import predictor
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner

PyTree = dict
Calls = Dict[str, Callable[[], object]]  # {'total': ..., 'prefill': ...}
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


def our_calls(config: T5Config, params: PyTree, inputs: np.ndarray, new_tokens: int,
              cpu_kernels: bool = False) -> Calls:
  """Greedy decoding of the batch `inputs` [batch, inputs_len] by the partitioned Predictor
  that gqa-eval uses (all devices, data-parallel), and its prefill alone (encoder + cache)."""
  decoder = predictor.from_host_params(EncoderDecoderModel(config), params, Partitioner(),
                                       cpu_kernels=cpu_kernels)
  tokens = np.asarray(inputs, np.int32)
  return {
      "total": lambda: decoder.predict(tokens, new_tokens, eos_id=NEVER_EOS),
      "prefill": lambda: jax.block_until_ready(decoder.decode_cache(tokens, new_tokens)),
  }


def hf_calls(hf_model, inputs: np.ndarray, new_tokens: int) -> Calls:
  """HF `generate()` (greedy, KV cache, exactly `new_tokens` new tokens), and its encoder."""
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

  return {"total": generate, "prefill": encode}


def _summary(seconds: Dict[str, List[float]], new_tokens: int) -> dict:
  """Medians of a variant's timed calls; step = (total - prefill) / new_tokens."""
  total, prefill = median(seconds["total"]), median(seconds["prefill"])
  return {"total_s": total, "prefill_s": prefill, "step_s": max(total - prefill, 0.0) / new_tokens,
          "seconds": seconds}


def time_interleaved(variants: Dict[str, Calls], repeats: int, new_tokens: int) -> Dict[str, dict]:
  """Calls everything once untimed (compile, warm up), then `repeats` rounds that each time
  every variant's calls in turn; -> {variant: {'total_s', 'prefill_s', 'step_s' (medians,
  seconds per batch), 'seconds' (every timed call)}}."""
  for name, calls in variants.items():
    print(f"  warm-up {name}", file=sys.stderr, flush=True)
    for call in calls.values():
      call()
  seconds = {name: {kind: [] for kind in calls} for name, calls in variants.items()}
  start = time.perf_counter()
  for round_ in range(1, repeats + 1):
    for name, calls in variants.items():
      for kind, call in calls.items():
        begin = time.perf_counter()
        call()
        seconds[name][kind].append(time.perf_counter() - begin)
    elapsed = time.perf_counter() - start
    times = ", ".join(f"{name} {s['total'][-1]:.2f}s" for name, s in seconds.items())
    print(f"  round {round_}/{repeats} ({times}); {elapsed:.0f}s elapsed, "
          f"ETA {elapsed / round_ * (repeats - round_):.0f}s", file=sys.stderr, flush=True)
  return {name: _summary(s, new_tokens) for name, s in seconds.items()}
