"""Greedy decoding speed against the number of K/V heads, and against HF transformers.

  python scripts/bench_decode.py --preset compare_hf --json out.json
      t5-v1_1-small shape, batch 8, input 512, output 128: ours per attention variant next
      to HF transformers' PyTorch generate() (MHA, same weights, same threads).
  python scripts/bench_decode.py --preset groups --json out.json --png groups.png
      Figure 6 at input 2048 / output 512: time per sample for every G dividing the heads,
      the bytes model's predicted step speedup over MHA and the measured / predicted ratio.

Weights are random: a HF T5ForConditionalGeneration saved with safetensors and loaded by
our importer (`gqa_flax.checkpoints.load`); GQA-G is mean-pooled from it. Our decoding runs
its step on the CPU kernels (`gqa_flax.kernels`) unless --no-cpu-kernels. Outputs are
forced to the full length on both sides. Variants (and HF) are timed in interleaved rounds,
so the machine's drift in speed falls on all of them alike. Progress goes to stderr.
"""
import argparse
import json
import os
import sys
import tempfile

PRESETS = {
    "compare_hf": dict(size="small", batch=8, inputs_len=512, outputs_len=128, hf=True),
    "groups": dict(size="small", batch=8, inputs_len=2048, outputs_len=512, hf=False),
}


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--preset", choices=sorted(PRESETS), default="compare_hf")
  parser.add_argument("--size", help="T5.1.1 size (tiny, small, base, ...)")
  parser.add_argument("--batch", type=int)
  parser.add_argument("--inputs-len", type=int)
  parser.add_argument("--outputs-len", type=int)
  parser.add_argument("--kv-heads", type=int, nargs="+",
                      help="K/V head counts (default: every divisor of the heads)")
  parser.add_argument("--hf", action=argparse.BooleanOptionalAction,
                      help="also time HF transformers (default: on for compare_hf)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="our params and activations (HF runs float32)")
  parser.add_argument("--cpu-kernels", action=argparse.BooleanOptionalAction, default=True,
                      help="our decode step on the hand-written CPU kernels (float32 only)")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                      help="CPU cores for XLA and torch (process affinity + torch threads)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--json", help="write the results here")
  parser.add_argument("--png", help="write the Figure-6-style plot here")
  args = parser.parse_args()
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def main():
  args = parse_args()
  # Before jax and torch start their thread pools: both size them from the affinity mask.
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import numpy as np
  import torch
  from gqa_flax import kernels
  from gqa_flax.benchmarks import bytes_model, machine, models, report, runners
  from gqa_flax.models import t5_1_1_config
  torch.set_num_threads(args.threads)
  if args.cpu_kernels and (args.dtype != "float32" or not kernels.available()):
    sys.exit("--cpu-kernels needs --dtype float32 and a C++ compiler (see any warning above); "
             "pass --no-cpu-kernels")

  info = machine.machine_info(args.threads)
  print(f"machine: {info}", file=sys.stderr, flush=True)
  bandwidth = machine.memory_bandwidth()
  print(f"numpy bandwidth: {bandwidth}", file=sys.stderr, flush=True)
  shape = t5_1_1_config(args.size)
  with tempfile.TemporaryDirectory() as path:
    hf_model = models.save_random_hf_t5(shape, path, args.seed)
    config, params = models.load_ours(path, args.dtype)
  inputs = np.random.RandomState(args.seed).randint(2, config.vocab_size,
                                                     (args.batch, args.inputs_len))
  heads = config.num_heads
  kv_heads = args.kv_heads or [g for g in range(heads, 0, -1) if heads % g == 0]
  kv_heads = sorted(set(kv_heads) | {heads}, reverse=True)  # MHA is the speedup baseline
  variants, step_bytes = {}, {}
  if args.hf:
    variants["HF"] = runners.hf_calls(hf_model, inputs, args.outputs_len)
  for g in kv_heads:
    g_config, g_params = models.with_kv_heads(config, params, g)
    variants[report.variant_name(g, heads)] = runners.our_calls(
        g_config, g_params, inputs, args.outputs_len, args.cpu_kernels)
    step_bytes[g] = bytes_model.step_bytes(g_config, args.batch, args.inputs_len,
                                           args.outputs_len, np.dtype(g_config.dtype).itemsize)
  del hf_model  # HF's calls keep it when it is timed
  print(f"timing {len(variants)} variants in {args.repeats} interleaved rounds ...",
        file=sys.stderr, flush=True)
  times = runners.time_interleaved(variants, args.repeats, args.outputs_len)
  ours = {g: times[report.variant_name(g, heads)] for g in kv_heads}
  rows = report.rows(ours, step_bytes, heads, args.batch, args.outputs_len, times.get("HF"))

  settings = {k: getattr(args, k) for k in ("preset", "size", "batch", "inputs_len",
                                             "outputs_len", "dtype", "cpu_kernels", "repeats",
                                             "seed")}
  info["load_average_end"] = machine.machine_info(args.threads)["load_average"]
  print(f"T5.1.1-{args.size} shape, batch {args.batch}, input {args.inputs_len}, output "
        f"{args.outputs_len}, greedy, {args.dtype}, "
        f"{'CPU kernels' if args.cpu_kernels else 'XLA ops only'}, median of {args.repeats} "
        "interleaved rounds")
  print(f"machine: {info['cpu']}, {args.threads} threads, load {info['load_average']} -> "
        f"{info['load_average_end']}; numpy read {bandwidth['read_GBps']:.1f} GB/s, "
        f"copy {bandwidth['copy_GBps']:.1f} GB/s")
  print(report.table(rows))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"settings": settings, "machine": {**info, **bandwidth}, "rows": rows,
                 "seconds_per_call": {name: t["seconds"] for name, t in times.items()}}, f,
                indent=2)
  if args.png:
    title = (f"T5.1.1-{args.size}, batch {args.batch}, input {args.inputs_len}, "
             f"output {args.outputs_len}, {args.threads} CPU threads")
    report.plot(rows, title, args.png, bandwidth["read_GBps"], args.batch, args.outputs_len)


if __name__ == "__main__":
  main()
