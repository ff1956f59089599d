"""Compiles a kernel's C++ source on first use into a per-machine cache and loads it.

The library is built with the C++ compiler found on PATH (`$CXX`, else `g++`) against the
XLA FFI headers of the installed jaxlib, with `-march=native`, so it is keyed by the source,
the flags, the jaxlib version and the CPU; a later call (or process) loads the cached file.
The cache is `$GQA_FLAX_KERNEL_CACHE`, else `$XDG_CACHE_HOME/gqa_flax/kernels`, else
`~/.cache/gqa_flax/kernels`. Builds are written to a temporary name and renamed into place,
so concurrent builds never load a half-written library.
"""
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
from typing import Optional

import jax
import jaxlib

FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def cache_dir() -> pathlib.Path:
  if os.environ.get("GQA_FLAX_KERNEL_CACHE"):
    return pathlib.Path(os.environ["GQA_FLAX_KERNEL_CACHE"])
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "gqa_flax" / "kernels"


def _cpu_model() -> str:
  try:
    lines = pathlib.Path("/proc/cpuinfo").read_text().splitlines()
  except OSError:
    return platform.processor()
  first = lambda prefix: next((line for line in lines if line.startswith(prefix)), "")
  return first("model name") + first("flags")


def library_path(source: pathlib.Path, compiler: str) -> pathlib.Path:
  """Where the build of `source` (and the headers beside it) for this machine, compiler and
  jaxlib lives."""
  texts = [path.read_text() for path in [source, *sorted(source.parent.glob("*.h"))]]
  key = hashlib.sha256("\0".join([*texts, compiler, *FLAGS, jaxlib.__version__,
                                   platform.machine(), _cpu_model()]).encode()).hexdigest()
  return cache_dir() / f"{source.stem}-{key[:16]}.so"


def build(source: pathlib.Path) -> pathlib.Path:
  """The cached shared library for `source`, compiled first if missing.

  Raises RuntimeError (with the compiler's message) when there is no compiler or it fails.
  """
  compiler = shutil.which(os.environ.get("CXX", "g++"))
  if compiler is None:
    raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
  target = library_path(source, compiler)
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
  os.close(fd)
  command = [compiler, *FLAGS, "-isystem", jax.ffi.include_dir(), str(source), "-o", tmp]
  logging.info("compiling %s -> %s", source.name, target)
  result = subprocess.run(command, capture_output=True, text=True)
  if result.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr.strip()}")
  os.replace(tmp, target)
  return target


def load(source: pathlib.Path) -> Optional[ctypes.CDLL]:
  """The compiled library of `source`, or None (with a logged warning) if it cannot be built."""
  try:
    return ctypes.CDLL(str(build(source)))
  except (RuntimeError, OSError) as error:
    logging.warning("CPU kernel %s unavailable, using XLA's ops instead: %s", source.name, error)
    return None


@functools.cache
def register(source: pathlib.Path, symbol: str, target: str) -> bool:
  """Builds `source` and registers its FFI handler `symbol` as XLA:CPU's custom call `target`.

  False (and nothing registered) when the default backend is not the CPU or the build fails.
  """
  if jax.default_backend() != "cpu":
    return False
  library = load(source)
  if library is None:
    return False
  jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
  return True
