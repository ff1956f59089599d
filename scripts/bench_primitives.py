"""How fast can a decode step be here? The bandwidth of the matrix products a step is made of.

  python scripts/bench_primitives.py --json out.json

A greedy decode step at batch 8 is a chain of small matrix products whose weights do not
fit in cache: x [batch, emb] @ W [emb, n] for every projection and the output layer, and
per K/V head q [group, head_dim] against K/V [length, head_dim]. This times each kind over
enough distinct operands (~200 MB) that every one is read from memory, side by side with
numpy's plain read bandwidth, in XLA (what our decoder compiles to), in our CPU kernels
(`gqa_flax.kernels`: what it runs with `cpu_kernels=True`) and in torch (what HF
transformers runs), and prints GB/s and XLA's fraction of numpy's read bandwidth: the
ceiling for `bench_decode.py`'s achieved GB/s. Their GFLOP/s is printed next to that of a
large product (the encoder's `[batch * input_len, emb] @ [emb, mlp]`), to tell whether a
kernel waits on memory or on arithmetic. Defaults are the T5.1.1-small shape.
"""
import argparse
import json
import os
import sys


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--emb", type=int, default=512)
  parser.add_argument("--widths", type=int, nargs="+", default=[384, 1024, 32128],
                      help="output widths n of the dense products (q/k/v, MLP, vocab)")
  parser.add_argument("--heads", type=int, default=6)
  parser.add_argument("--head-dim", type=int, default=64)
  parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
  parser.add_argument("--large", type=int, nargs=3, default=[4096, 512, 1024],
                      metavar=("M", "K", "N"), help="the large product [M, K] @ [K, N]")
  parser.add_argument("--megabytes", type=int, default=200, help="operand bytes per timing")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--json", help="write the results here")
  return parser.parse_args()


def main():
  args = parse_args()
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:args.threads])
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from gqa_flax import kernels
  from gqa_flax.benchmarks import machine
  from gqa_flax.kernels import decode_attention, panel_matmul
  if not kernels.available():
    sys.exit("the CPU kernels did not build here (see the warning above)")
  torch.set_num_threads(args.threads)
  rng = np.random.RandomState(0)

  def seconds_per_call(fn, repeats):
    fn()  # compile, warm up
    return machine.best_seconds(fn, repeats)

  bandwidth = machine.memory_bandwidth()
  m, k, n = args.large  # compute-bound: the same operands every call
  a, b = rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n))
  b = b.astype(np.float32)
  xla_matmul = jax.jit(lambda a, b: a @ b)
  ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
  large = {"shape": args.large,
           "xla_GFLOPs": 2 * m * k * n / seconds_per_call(
               lambda: xla_matmul(ja, jb).block_until_ready(), args.repeats) / 1e9}
  with torch.inference_mode():
    large["torch_GFLOPs"] = 2 * m * k * n / seconds_per_call(lambda: ta @ tb, args.repeats) / 1e9
  print(f"  large product {m}x{k}x{n}: XLA {large['xla_GFLOPs']:.0f} GFLOP/s, "
        f"torch {large['torch_GFLOPs']:.0f} GFLOP/s", file=sys.stderr, flush=True)
  rows = []

  def record(kind, shape, nbytes, flops, xla_s, kernel_s, torch_s):
    row = {"kind": kind, "shape": shape, "MB": nbytes / 1e6,
           "xla_GBps": nbytes / xla_s / 1e9, "kernel_GBps": nbytes / kernel_s / 1e9,
           "torch_GBps": nbytes / torch_s / 1e9, "xla_GFLOPs": flops / xla_s / 1e9}
    row["xla_over_numpy_read"] = row["xla_GBps"] / bandwidth["read_GBps"]
    row["xla_over_large_product"] = row["xla_GFLOPs"] / large["xla_GFLOPs"]
    rows.append(row)
    print(f"  {kind} {shape}: XLA {row['xla_GBps']:.1f} GB/s, kernel {row['kernel_GBps']:.1f} "
          f"GB/s, torch {row['torch_GBps']:.1f} GB/s", file=sys.stderr, flush=True)

  def operands(shape):
    count = max(2, args.megabytes * 10**6 // (4 * int(np.prod(shape))))
    return [rng.standard_normal(shape).astype(np.float32) for _ in range(count)]

  x = rng.standard_normal((args.batch, args.emb)).astype(np.float32)
  for n in args.widths:  # dense: x [batch, emb] @ W [emb, n] over distinct W
    ws = operands((args.emb, n))
    xla = jax.jit(lambda x, ws: [x @ w for w in ws])
    jx, jws = jnp.asarray(x), [jnp.asarray(w) for w in ws]
    tx, tws = torch.from_numpy(x), [torch.from_numpy(w) for w in ws]
    xla_s = seconds_per_call(lambda: jax.block_until_ready(xla(jx, jws)), args.repeats)
    packed = [panel_matmul.pack_panels(w) for w in jws]
    kernel = jax.jit(lambda x, ps: [panel_matmul.panel_matmul(x, p, n) for p in ps])
    kernel_s = seconds_per_call(lambda: jax.block_until_ready(kernel(jx, packed)), args.repeats)
    del packed
    with torch.inference_mode():
      torch_s = seconds_per_call(lambda: [tx @ w for w in tws], args.repeats)
    record("dense", [args.batch, args.emb, n], sum(w.nbytes for w in ws),
           len(ws) * 2 * args.batch * args.emb * n, xla_s, kernel_s, torch_s)

  for kv_heads in (args.heads, 1):  # MHA: 1 query row per K/V head; MQA: all heads share one
    for length in args.lengths:  # attention: softmax(q K^T) V over distinct K, V
      shape = (args.batch * kv_heads, length, args.head_dim)
      ks, vs = operands(shape), operands(shape)
      q = rng.standard_normal((shape[0], args.heads // kv_heads, args.head_dim))
      q = q.astype(np.float32)

      def attend(q, ks, vs, einsum, softmax):
        return [einsum("xmt,xtd->xmd", softmax(einsum("xmd,xtd->xmt", q, k)), v)
                for k, v in zip(ks, vs)]
      xla = jax.jit(lambda q, ks, vs: attend(q, ks, vs, jnp.einsum,
                                             lambda a: jax.nn.softmax(a, -1)))
      jq, jks, jvs = jnp.asarray(q), [jnp.asarray(k) for k in ks], [jnp.asarray(v) for v in vs]
      tq, tks, tvs = (torch.from_numpy(q), [torch.from_numpy(k) for k in ks],
                      [torch.from_numpy(v) for v in vs])
      xla_s = seconds_per_call(lambda: jax.block_until_ready(xla(jq, jks, jvs)), args.repeats)
      heads_major = lambda x: x.reshape(args.batch, kv_heads, length, args.head_dim)
      kernel = jax.jit(lambda q, ks, vs: [decode_attention.decode_attention(
          q.reshape(args.batch, 1, args.heads, args.head_dim), heads_major(k), heads_major(v),
          jnp.zeros((1, 1, 1, length), jnp.float32)) for k, v in zip(ks, vs)])
      kernel_s = seconds_per_call(lambda: jax.block_until_ready(kernel(jq, jks, jvs)),
                                  args.repeats)
      with torch.inference_mode():
        torch_s = seconds_per_call(
            lambda: attend(tq, tks, tvs, torch.einsum, lambda a: torch.softmax(a, -1)),
            args.repeats)
      record(f"attention kv_heads={kv_heads}", [args.batch, kv_heads, length, args.head_dim],
             sum(k.nbytes + v.nbytes for k, v in zip(ks, vs)),
             len(ks) * 2 * 2 * args.batch * args.heads * length * args.head_dim, xla_s, kernel_s,
             torch_s)

  print(f"{machine.cpu_model()}, {args.threads} threads; numpy read "
        f"{bandwidth['read_GBps']:.1f} GB/s, copy {bandwidth['copy_GBps']:.1f} GB/s; "
        f"large product {'x'.join(map(str, args.large))}: XLA {large['xla_GFLOPs']:.0f} GFLOP/s, "
        f"torch {large['torch_GFLOPs']:.0f} GFLOP/s")
  print("| product | shape | MB | XLA GB/s | kernel GB/s | torch GB/s | XLA / numpy read "
        "| XLA GFLOP/s | XLA / large product |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['kind']} | {'x'.join(map(str, r['shape']))} | {r['MB']:.0f} | "
          f"{r['xla_GBps']:.1f} | {r['kernel_GBps']:.1f} | {r['torch_GBps']:.1f} | "
          f"{r['xla_over_numpy_read']:.2f} | "
          f"{r['xla_GFLOPs']:.1f} | {r['xla_over_large_product']:.2f} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"settings": vars(args), "machine": {**machine.machine_info(args.threads),
                                                      **bandwidth}, "large_product": large,
                 "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
