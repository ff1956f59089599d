"""Few-row dense products on the CPU from column-panel weights (`panel_matmul.cc`).

A decode step at batch 8 multiplies 8 rows by every decoder weight matrix. XLA:CPU streams a
row-major `[k, n]` weight at about a third of this machine's read bandwidth for such products;
the same product from the weight packed into contiguous column panels `[ceil(n/32), k, 32]`
runs about twice as fast (`scripts/bench_primitives.py` measures both). Decoding packs the
decoder's kernels once per call, before its loop (`gqa_flax.decoding`), and `DenseGeneral`
uses the panels when they are given.
"""
import pathlib

import jax
import jax.numpy as jnp

from gqa_flax.kernels import build

PANEL = 32  # columns per panel, as in panel_matmul.cc
_SOURCE = pathlib.Path(__file__).with_suffix(".cc")
_TARGET = "gqa_panel_matmul"


def available() -> bool:
  """Whether the default backend is the CPU and the kernel is built and registered with XLA."""
  return build.register(_SOURCE, "GqaPanelMatmul", _TARGET)


def pack_panels(kernel: jax.Array) -> jax.Array:
  """[k, n] -> float32 [ceil(n/32), k, 32]: panel p holds columns 32p..32p+31 (zero-padded)."""
  k, n = kernel.shape
  num_panels = -(-n // PANEL)
  padded = jnp.pad(jnp.asarray(kernel, jnp.float32), ((0, 0), (0, num_panels * PANEL - n)))
  return padded.reshape(k, num_panels, PANEL).transpose(1, 0, 2)


def panel_matmul(x: jax.Array, panels: jax.Array, features: int) -> jax.Array:
  """x [m, k] float32 @ the kernel packed in `panels` -> [m, features] float32.

  Needs `available()`; `features` is the unpacked kernel's n.
  """
  if not available():
    raise RuntimeError("panel_matmul needs the CPU backend and a C++ compiler (see the log); "
                       "decode with cpu_kernels=False")
  out = jax.ShapeDtypeStruct((x.shape[0], features), jnp.float32)
  return jax.ffi.ffi_call(_TARGET, out)(jnp.asarray(x, jnp.float32), panels)
