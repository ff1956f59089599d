"""The host: CPU, threads, load, and memory bandwidth measured with numpy."""
import os
import platform
import time

import numpy as np


def best_seconds(fn, repeats: int) -> float:
  """The shortest of `repeats` timed calls of `fn`, in seconds."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def memory_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> dict:
  """Best-of-`repeats` numpy bandwidth in GB/s over an `nbytes` float64 array (one thread).

  read: `a.sum()` reads nbytes; copy: `np.copyto(b, a)` reads and writes nbytes (2 * nbytes
  moved).
  """
  a = np.ones(nbytes // 8)
  b = np.empty_like(a)
  read = best_seconds(a.sum, repeats)
  copy = best_seconds(lambda: np.copyto(b, a), repeats)
  return {"read_GBps": a.nbytes / read / 1e9, "copy_GBps": 2 * a.nbytes / copy / 1e9,
          "array_MB": a.nbytes / 1e6}


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_info(threads: int) -> dict:
  """CPU model, cores visible, threads used and the 1/5/15-minute load average now."""
  return {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
          "load_average": [round(x, 2) for x in os.getloadavg()]}
