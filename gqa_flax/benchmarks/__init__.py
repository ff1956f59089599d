"""Decode-speed benchmarking (issue 7): ours vs HF transformers, and time against GQA groups.

  machine      numpy memory bandwidth and a description of the host
  bytes_model  analytic bytes read per decode step (params + self-attention cache + cross K/V)
  models       a random T5 v1.1 saved by HF, loaded by our importer, mean-pooled to G K/V heads
  runners      timed greedy decoding: ours (one jit'd while_loop) and HF's `generate()`
  report       tables and the Figure-6-style plot

`scripts/bench_decode.py` is the command-line entry point; `scripts/bench_primitives.py` times the
matrix products a decode step is made of (the ceiling for its bandwidth).
"""
