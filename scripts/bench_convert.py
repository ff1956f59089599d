"""Benchmark gqa-convert on a T5.1.1-shaped checkpoint: wall time, throughput, peak RSS.

Writes a random-valued T5.1.1 checkpoint (default Large, 783M parameters, float32 ~3.1 GB) as a
legacy T5X checkpoint (TensorStore zarr arrays, the public checkpoints' format), one array at a
time, then converts it to GQA-G with each --methods in turn, each in a subprocess (so the
writer's memory does not count), and prints each conversion's wall time, throughput and peak
RSS (its VmHWM) beside the checkpoint size, and each method's time and memory as a ratio of the
first method's. `aligned` here aligns the kernels alone (no calibration task: its calibration
runs the whole model on real examples, which a random checkpoint has no use for).

  python scripts/bench_convert.py [--size large] [--num_kv_heads 8] [--methods mean,aligned]
      [--workdir DIR]
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
from tqdm import tqdm

from gqa_flax.checkpoints.arrays import LazyArray
from gqa_flax.checkpoints.convert import METHODS
from gqa_flax.checkpoints.shapes import expected_shapes
from gqa_flax.checkpoints.t5x_legacy import write_t5x_legacy
from gqa_flax.models.config import PRESETS, t5_1_1_config

# gqa-convert, then its own peak RSS (VmHWM) written to argv[1]. Not getrusage: a child's
# ru_maxrss also counts the parent's RSS at the fork (this script holds jax and has written
# the checkpoint), which would overstate the converter's.
_CONVERT_REPORTING_PEAK_RSS = """
import sys
from gqa_flax.convert import main
code = main(sys.argv[2:])
with open("/proc/self/status") as status, open(sys.argv[1], "w") as out:
  out.write(next(line for line in status if line.startswith("VmHWM:")))
sys.exit(code)
"""


def random_checkpoint(directory: str, size: str) -> int:
  """Writes a random float32 T5.1.1-`size` legacy T5X checkpoint; returns its parameter bytes."""
  shapes = expected_shapes(t5_1_1_config(size))
  bar = tqdm(total=sum(4 * int(np.prod(s)) for s in shapes.values()), unit="B", unit_scale=True,
             desc=f"writing T5.1.1-{size}")

  def random_array(index, shape):
    def read():
      value = np.random.default_rng(index).standard_normal(shape, dtype=np.float32)
      bar.update(value.nbytes)
      return value
    return LazyArray(shape, np.dtype(np.float32), read)

  arrays = {name: random_array(i, shape) for i, (name, shape) in enumerate(shapes.items())}
  write_t5x_legacy(directory, arrays, step=1000000)
  bar.close()
  return sum(array.nbytes for array in arrays.values())


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def convert(src: str, dst: str, num_kv_heads: int, method: str, workdir: str) -> tuple:
  """(wall seconds, peak RSS bytes) of gqa-convert --method `method` in a subprocess."""
  peak_file = os.path.join(workdir, "peak_rss")
  start = time.perf_counter()
  subprocess.run([sys.executable, "-c", _CONVERT_REPORTING_PEAK_RSS, peak_file, "--src", src,
                  "--dst", dst, "--num_kv_heads", str(num_kv_heads), "--method", method],
                 check=True)
  wall = time.perf_counter() - start
  with open(peak_file) as f:
    return wall, int(f.read().split()[1]) * 1024  # 'VmHWM: N kB'.


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--size", choices=PRESETS, default="large")
  parser.add_argument("--num_kv_heads", type=int, default=8)
  parser.add_argument("--methods", default="mean", help="comma-separated gqa-convert methods, "
                      f"each converted in turn ({', '.join(METHODS)})")
  parser.add_argument("--workdir", default=None, help="where to write (default: a temp dir)")
  args = parser.parse_args()
  methods = args.methods.split(",")
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    parser.error(f"unknown --methods {unknown}; choose from {', '.join(METHODS)}")
  workdir = tempfile.mkdtemp(dir=args.workdir, prefix="bench_convert_")
  try:
    src = os.path.join(workdir, "checkpoint_1000000")
    param_bytes = random_checkpoint(src, args.size)
    gb = 1e9
    print(f"T5.1.1-{args.size}: {param_bytes / 4 / 1e6:.0f}M parameters, checkpoint "
          f"{param_bytes / gb:.2f} GB (float32; {directory_bytes(src) / gb:.2f} GB on disk)")
    first = None
    for method in methods:
      dst = os.path.join(workdir, f"gqa_{method}")
      wall, peak_rss = convert(src, dst, args.num_kv_heads, method, workdir)
      first = first or (method, wall, peak_rss)
      print(f"{method} -> GQA-{args.num_kv_heads}: converted {directory_bytes(dst) / gb:.2f} GB, "
            f"wall time {wall:.1f} s ({wall / first[1]:.2f} x {first[0]}), throughput "
            f"{param_bytes / gb / wall:.3f} GB/s read, peak RSS {peak_rss / gb:.3f} GB "
            f"({peak_rss / first[2]:.2f} x {first[0]}) = {peak_rss / param_bytes:.3f} x checkpoint "
            f"size (target <= 0.25): {'PASS' if peak_rss <= param_bytes / 4 else 'FAIL'}")
      shutil.rmtree(dst)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
  main()
