"""Calibration activations for `gqa-convert --method aligned --calibration_task_gin GIN`.

What the alignment needs of the data is, for every decoder attention, the second moment
X^T X [emb, emb] of the inputs of its key/value projections over real examples: for
self-attention the decoder's own normalised hidden states, for cross-attention the encoder's
output, each over the positions that are not padding. They come from the multi-head model
run teacher-forced on the first examples of a task's split (the pre-training task's train
split, say), in batches, with a progress bar; the attentions' inputs are caught with
`flax.linen.intercept_methods`, so the model is the one the project trains, unchanged.
The model is held whole in host memory while it runs.
"""
from typing import Dict, Iterable, Iterator, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gqa_flax import errors
from gqa_flax.models import Transformer
from gqa_flax.models.attention import MultiHeadDotProductAttention
from gqa_flax.models.config import T5Config
from gqa_flax.training import data_pipeline, evaluation


def _batch_grams(config: T5Config, params, batch: Mapping[str, jax.Array]
                 ) -> Dict[str, jax.Array]:
  """{'decoder/layers_<i>/<self_attention|encoder_decoder_attention>': X^T X [emb, emb]} of
  one batch, padding positions left out."""
  inputs = {}

  def catch(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, MultiHeadDotProductAttention) and context.method_name == "__call__"
        and module.path[0] == "decoder"):
      inputs["/".join(module.path)] = args[1]  # inputs_kv [batch, kv_len, emb]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(catch):
    Transformer(config).apply({"params": params}, batch["encoder_input_tokens"],
                              batch["decoder_input_tokens"], batch["decoder_target_tokens"])
  masks = {"encoder_decoder_attention": batch["encoder_input_tokens"] > 0,
           "self_attention": batch["decoder_target_tokens"] > 0}
  grams = {}
  for path, x in inputs.items():
    x = x.astype(jnp.float32) * masks[path.rsplit("/", 1)[1]][..., None]
    grams[path] = jnp.einsum("ble,blf->ef", x, x)
  return grams


def kv_input_grams(config: T5Config, params, batches: Iterable[Mapping[str, np.ndarray]]
                   ) -> Dict[str, np.ndarray]:
  """The sums over `batches` of `_batch_grams` (float64)."""
  step = jax.jit(lambda params, batch: _batch_grams(config, params, batch))
  total: Dict[str, np.ndarray] = {}
  for batch in batches:
    for path, gram in step(params, batch).items():
      total[path] = total.get(path, 0.0) + np.asarray(gram, np.float64)
  return total


def task_batches(cfg: data_pipeline.DatasetConfig, num_examples: int
                 ) -> Iterator[Mapping[str, np.ndarray]]:
  """`evaluation.first_examples`' batches (padding rows are empty, so they add nothing),
  with a progress bar."""
  seen = 0
  with tqdm(total=num_examples, desc="calibration examples", unit="ex") as bar:
    for batch, rows in evaluation.first_examples(cfg, num_examples):
      seen += rows
      bar.update(rows)
      yield batch
  if not seen:
    raise errors.UserError(f"the {cfg.split} split of {cfg.mixture_or_task_name} has no "
                           "examples to calibrate on")
