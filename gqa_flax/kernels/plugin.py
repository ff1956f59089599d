"""The CPU kernels plugged into the model from outside it, by flax method interception.

The model package knows nothing of them. Inside `on_cpu_kernels()`, a module given its
kernel's panels (collection `KERNEL_PANELS`, `kernel [ceil(n/32), k, 32]` packed by
`panel_matmul.pack_panels`) runs on them:
  * `DenseGeneral.__call__`: the product with the panels instead of the kernel;
  * `MultiHeadDotProductAttention.attend` of a decode step (query length 1, no dropout, a
    supported head_dim): `decode_attention` instead of XLA's grouped attention.
Every other call runs as the model defines it. `gqa_flax.decoding` enters the context for
its steps when called with `cpu_kernels=True`.
"""
import numpy as np
from flax import linen as nn

from gqa_flax.kernels import decode_attention, panel_matmul
from gqa_flax.models import layers
from gqa_flax.models.attention import MultiHeadDotProductAttention

KERNEL_PANELS = "kernel_panels"


def _dense_on_panels(module: layers.DenseGeneral, x):
  features = tuple(np.atleast_1d(module.features))
  in_shape = x.shape[-module.num_contracting_axes:]
  rows = x.reshape(-1, int(np.prod(in_shape)))  # [m, k]
  y = panel_matmul.panel_matmul(rows, module.get_variable(KERNEL_PANELS, "kernel"),
                                int(np.prod(features)))
  return y.reshape(x.shape[:x.ndim - len(in_shape)] + features).astype(module.dtype)


def _on_kernels(next_fun, args, kwargs, context):
  module, method = context.module, context.method_name
  if (isinstance(module, layers.DenseGeneral) and method == "__call__"
      and module.has_variable(KERNEL_PANELS, "kernel")):
    return _dense_on_panels(module, *args, **kwargs)
  if isinstance(module, MultiHeadDotProductAttention) and method == "attend":
    query, key, value, bias, *rest = args
    dropout = rest[0] if rest else kwargs.get("dropout")
    if (module.has_variable(KERNEL_PANELS, "query") and dropout is None
        and decode_attention.supports(query, key)):
      return decode_attention.decode_attention(query, key, value, bias)
  return next_fun(*args, **kwargs)


def on_cpu_kernels():
  """The context in which modules with panels run on the CPU kernels."""
  return nn.intercept_methods(_on_kernels)
