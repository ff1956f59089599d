"""JAX's persistent compilation cache for the project's many short processes.

The test suite and `gqa-reproduce` start dozens of processes (training, conversion and
evaluation stages) that compile the same programs again; with the cache a process loads what
an earlier one compiled. One directory per jax/jaxlib version pair, so an upgrade never reads
another version's entries; every program is cached, however small or quick to compile.
Nothing here imports JAX: callers set these before JAX is imported (or in a child's
environment).
"""
import os
from importlib import metadata
from typing import Dict


def cache_dir() -> str:
  """$GQA_FLAX_CACHE (default ~/.cache/gqa_flax)/jax_compilation_cache/jax<v>-jaxlib<v>."""
  root = os.environ.get("GQA_FLAX_CACHE", os.path.expanduser("~/.cache/gqa_flax"))
  versions = "-".join(f"{name}{metadata.version(name)}" for name in ("jax", "jaxlib"))
  return os.path.join(root, "jax_compilation_cache", versions)


def environment() -> Dict[str, str]:
  """The JAX_* variables that turn the cache on for a process and its children."""
  return {"JAX_COMPILATION_CACHE_DIR": cache_dir(),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1"}
