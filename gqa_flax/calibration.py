"""Calibration activations for `gqa-convert --method aligned --calibration_task_gin GIN`.

What the alignment needs of the data is, for every decoder attention, the second moment
X^T X [emb, emb] of the inputs of its key/value projections over real examples: for
self-attention the decoder's own normalised hidden states, for cross-attention the encoder's
output (the same for every layer), each over the positions that are not padding. They come
from the multi-head model run teacher-forced on the first examples of a task's split (the
pre-training task's train split, say).

Streaming: the model runs stack by stack and layer by layer over all the examples, each
layer's parameters read from the checkpoint once, when its turn comes, and dropped after it;
what is kept between layers is every example's hidden state [examples, length, emb]. So
memory is one layer's parameters, the token embedding and the examples' activations, not the
model, and the decoder's final norm and logits are never read. The layers are the model's own
(`EncoderLayer`, `DecoderLayer`, the stacks' attention biases); the self-attention inputs are
caught with `flax.linen.intercept_methods`.
"""
from typing import Dict, Iterable, Iterator, List, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gqa_flax import errors
from gqa_flax.checkpoints.arrays import LazyArray, unflatten
from gqa_flax.models import layers, t5
from gqa_flax.models.attention import MultiHeadDotProductAttention
from gqa_flax.models.config import T5Config
from gqa_flax.training import data_pipeline, evaluation

Batch = Mapping[str, np.ndarray]


def _params(arrays: Mapping[str, LazyArray], prefix: str) -> dict:
  """The parameter tree under `prefix` (e.g. 'decoder/layers_3'), read now."""
  return unflatten({name[len(prefix) + 1:]: jnp.asarray(array.read())
                    for name, array in arrays.items() if name.startswith(prefix + "/")})


def _relpos(config: T5Config, bidirectional: bool, table: dict) -> t5.RelativePositionBias:
  module = t5.relative_position_biases(config, bidirectional)
  return lambda query, key: module.apply({"params": table}, query, key)


def _gram(x: jax.Array, real: jax.Array) -> jax.Array:
  """x [batch, length, emb], real [batch, length] bool -> X^T X [emb, emb] over real positions."""
  x = x.astype(jnp.float32) * real[..., None]
  return jnp.einsum("ble,blf->ef", x, x)


def _layer_steps(config: T5Config):
  """(embed, encoder layer, encoder norm, decoder layer) jitted, one batch at a time."""
  def embed(table, tokens):
    embedder = layers.Embed(config.vocab_size, config.emb_dim, dtype=config.dtype)
    return embedder.apply({"params": table}, tokens).astype(config.dtype)

  def encoder_layer(params, relpos, x, batch):
    bias = t5.encoder_bias(_relpos(config, True, relpos), batch["encoder_input_tokens"])
    return t5.EncoderLayer(config).apply({"params": params}, x, bias, True)

  def encoder_norm(params, x):
    return layers.LayerNorm(dtype=config.dtype).apply({"params": params}, x)

  def decoder_layer(params, relpos, x, encoded, batch, with_output=True):
    """-> (the layer's output, or None without `with_output` (the last layer: XLA then
    drops all that comes after the self-attention's inputs), the gram of its
    self-attention's key/value inputs)."""
    self_bias, cross_bias = t5.teacher_forced_biases(
        _relpos(config, False, relpos), batch["encoder_input_tokens"],
        batch["decoder_input_tokens"], batch["decoder_target_tokens"])
    caught = []

    def catch(next_fun, args, kwargs, context):
      if (isinstance(context.module, MultiHeadDotProductAttention)
          and context.method_name == "__call__" and context.module.name == "self_attention"):
        caught.append(args[1])  # inputs_kv [batch, targets_len, emb]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(catch):
      y = t5.DecoderLayer(config).apply({"params": params}, x, encoded, self_bias, cross_bias,
                                        True)
    return y if with_output else None, _gram(caught[0], batch["decoder_target_tokens"] > 0)

  return (jax.jit(embed), jax.jit(encoder_layer), jax.jit(encoder_norm),
          jax.jit(decoder_layer, static_argnames="with_output"))


def kv_input_grams(config: T5Config, arrays: Mapping[str, LazyArray], batches: Iterable[Batch]
                   ) -> Dict[str, np.ndarray]:
  """{'decoder/layers_<i>/<self_attention|encoder_decoder_attention>': X^T X [emb, emb]}
  (float64) summed over `batches`, for the multi-head model whose checkpoint arrays (flat
  names, read lazily) are `arrays`, padding positions left out."""
  batches: List[Batch] = [{k: jnp.asarray(v) for k, v in b.items()} for b in batches]
  largest = max((int(v.max()) for b in batches for k, v in b.items() if k.endswith("_tokens")),
                default=-1)
  if largest >= config.vocab_size:
    raise errors.UserError(f"the calibration examples hold token id {largest}, outside the "
                           f"model's vocabulary of {config.vocab_size}; calibrate on a task "
                           "with the model's own vocabulary")
  embed, encoder_layer, encoder_norm, decoder_layer = _layer_steps(config)
  table = _params(arrays, "token_embedder")
  total = config.num_encoder_layers + config.num_decoder_layers
  grams: Dict[str, np.ndarray] = {}
  with tqdm(total=total, desc="calibration layers", unit="layer") as bar:
    relpos = _params(arrays, "encoder/relpos_bias")
    x = [embed(table, b["encoder_input_tokens"]) for b in batches]
    for i in range(config.num_encoder_layers):
      params = _params(arrays, f"encoder/layers_{i}")
      x = [encoder_layer(params, relpos, h, b) for h, b in zip(x, batches)]
      bar.update()
    params = _params(arrays, "encoder/encoder_norm")
    encoded = [encoder_norm(params, h) for h in x]
    cross = sum(np.asarray(_gram(e, b["encoder_input_tokens"] > 0), np.float64)
                for e, b in zip(encoded, batches))
    relpos = _params(arrays, "decoder/relpos_bias")
    x = [embed(table, b["decoder_input_tokens"]) for b in batches]
    for i in range(config.num_decoder_layers):
      params = _params(arrays, f"decoder/layers_{i}")
      last = i == config.num_decoder_layers - 1
      outputs = [decoder_layer(params, relpos, h, e, b, with_output=not last)
                 for h, e, b in zip(x, encoded, batches)]
      x = [y for y, _ in outputs]
      grams[f"decoder/layers_{i}/self_attention"] = sum(
          np.asarray(gram, np.float64) for _, gram in outputs)
      grams[f"decoder/layers_{i}/encoder_decoder_attention"] = cross.copy()
      bar.update()
  return grams


def task_batches(cfg: data_pipeline.DatasetConfig, num_examples: int) -> Iterator[Batch]:
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
