"""Hand-written CPU kernels for the decode step, called from XLA through its FFI.

`panel_matmul` (dense products from column-panel weights) and `decode_attention` (one query
position's grouped attention over the caches) are compiled on first use (`build`).
"""
from gqa_flax.kernels import decode_attention, panel_matmul


def available() -> bool:
  """Whether decoding can use the CPU kernels (`cpu_kernels=True`) here."""
  return panel_matmul.available() and decode_attention.available()
