"""Partitioned inference in one place: a checkpoint restored onto the mesh and decoded there.

Every caller that decodes goes through `Predictor`: gqa-eval and gqa-infer, the training
loop's inference eval, the reproduction's evaluate and timing stages (Figure 6 too) and the
decode benchmarks.

  predictor, step = Predictor.restore(checkpoint_path, Partitioner(num_partitions=8),
                                      dtype="bfloat16")
  tokens = predictor.predict(inputs, max_decode_length=256)   # [batch, 256] numpy, every host

Layout (`Partitioner`): parameters by the logical axis rules, restored straight into their
shardings and cast to the decode dtype while reading (no host holds the whole model); the
batch over 'data'; the decode caches [batch, kv_heads, length, head_dim] with the batch over
'data' and kv_heads over 'model' where the model axis divides them. With fewer K/V heads
than the model axis (MQA, GQA-4 on 8) the K/V kernels are replicated over 'model'; their
caches too by default, so each model shard reads all K/V of its batch rows (what standard
sharding does for MQA, the paper's section 2.2), or with `Partitioner.kv_batch_partitioned`
split by batch over 'data' x 'model', each attention then running on its device's rows
(Pope et al. 2022's batch-partitioned multi-query attention; the batch is padded to a
multiple of every device).

Multi-host: every host calls `predict` with the same global batch (numpy); each device decodes
its own rows, so a host decodes an equal share of every batch (the callers pad the last one),
and the tokens come back to every host, which score them; one host writes the files.
"""
import functools
from typing import Any, Callable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from gqa_flax import checkpoints, decoding
from gqa_flax.models import T5Config
from gqa_flax.training import trainer
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner

_SHAPES = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}


def param_shardings(partitioner: Partitioner, config: T5Config) -> Any:
  """NamedShardings of the params of `config` (abstract init: nothing allocated)."""
  return partitioner.param_shardings(trainer.abstract_params(EncoderDecoderModel(config), _SHAPES))


def _global(array: np.ndarray, sharding) -> jax.Array:
  """A numpy array held whole by every host -> the global array in `sharding`."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _pad_rows(inputs: np.ndarray, multiple: int) -> np.ndarray:
  """int32 `inputs` [batch, length] with copies of its first row appended up to a multiple of
  `multiple` rows (the data axis must divide the batch; callers drop the copies' outputs)."""
  inputs = np.asarray(inputs, np.int32)
  missing = -inputs.shape[0] % multiple
  return np.concatenate([inputs, np.repeat(inputs[:1], missing, axis=0)]) if missing else inputs


def _to_host(array: jax.Array) -> np.ndarray:
  """The whole of a global array, on every host."""
  if array.is_fully_addressable:
    return np.asarray(array)
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class Predictor:
  """A model's params on a mesh and its partitioned, jit-compiled decoding.

  params: the model's params in `param_shardings(partitioner, model.config)` (e.g. a training
  state's); cpu_kernels: decode steps on gqa_flax.kernels (CPU, float32, one device).
  """

  def __init__(self, model: EncoderDecoderModel, params: Any, partitioner: Partitioner,
               cpu_kernels: bool = False):
    self.model, self.params, self.partitioner = model, params, partitioner
    self.cpu_kernels = cpu_kernels
    self.param_shardings = jax.tree.map(lambda x: x.sharding, params)
    self._decoders = {}

  @classmethod
  def restore(cls, checkpoint_path: str, partitioner: Optional[Partitioner] = None,
              model: Optional[EncoderDecoderModel] = None, dtype: Optional[str] = None,
              cpu_kernels: bool = False) -> Tuple["Predictor", Optional[int]]:
    """(predictor, step) of a checkpoint of any supported format (a root: its latest step).

    The checkpoint's stored config wins; `model`'s is used for one that stores none (T5X
    legacy), whose config is otherwise inferred from its shapes. `dtype`: the params' dtype
    on device (default: the model's activation dtype, config.dtype).
    """
    partitioner = partitioner or Partitioner()
    source = checkpoints.open_checkpoint(checkpoint_path)
    config = model.config if model is not None and source.format == "t5x_legacy" else \
        source.config
    dtype = dtype or config.dtype
    shardings = param_shardings(partitioner, config)
    loaded = checkpoints.load_sharded(checkpoint_path, lambda _: shardings, dtype)
    model = EncoderDecoderModel(config) if model is None else \
        EncoderDecoderModel(config, model.z_loss, model.label_smoothing,
                            model.loss_normalizing_factor)
    return cls(model, loaded.params, partitioner, cpu_kernels), loaded.step

  def decode_program(self, max_decode_length: int, beam_size: int = 1, alpha: float = 0.6,
                     eos_id: int = 1) -> Callable:
    """The jit-compiled decoding `predict` runs: (params, inputs [batch, inputs_len] over
    'data') -> tokens [batch, max_decode_length] (greedy, or the best beam). gqa-plan lowers
    this same program for a TPU slice (planning/decode_plan.py)."""
    key = (max_decode_length, beam_size, alpha, eos_id)
    if key not in self._decoders:
      common = dict(max_decode_length=max_decode_length, eos_id=eos_id,
                    cpu_kernels=self.cpu_kernels, shardings=self.partitioner)
      if beam_size == 1:
        fn = functools.partial(decoding.greedy_decode, self.model.module, **common)
      else:
        beam = functools.partial(decoding.beam_search, self.model.module, beam_size=beam_size,
                                 alpha=alpha, **common)
        fn = lambda params, inputs: beam(params, inputs)[0][:, 0]  # the best beam
      data = self.partitioner.batch_sharding()
      self._decoders[key] = jax.jit(fn, in_shardings=(self.param_shardings, data),
                                    out_shardings=data)
    return self._decoders[key]

  def prefill_program(self, max_decode_length: int) -> Callable:
    """The start of greedy `decode_program`, jit-compiled alone: (params, inputs) -> (encoded
    [batch, inputs_len, emb], the decode cache in `Partitioner.cache_shardings`)."""
    key = ("prefill", max_decode_length)
    if key not in self._decoders:
      prefill = functools.partial(decoding.prefill, self.model.module,
                                  max_decode_length=max_decode_length, shardings=self.partitioner)
      data = self.partitioner.batch_sharding()
      self._decoders[key] = jax.jit(prefill, in_shardings=(self.param_shardings, data))
    return self._decoders[key]

  def step_program(self, max_decode_length: int, cache: Any) -> Callable:
    """One step of greedy `decode_program`'s loop, jit-compiled alone: (params, cache,
    encoded, inputs, tokens [batch]) -> (logits [batch, vocab], cache), the cache (arrays or
    ShapeDtypeStructs of `prefill_program`'s) donated and kept in its shardings."""
    caches = self.partitioner.cache_shardings(cache)
    data = self.partitioner.batch_sharding()
    step = functools.partial(decoding.decode_step, self.model.module,
                             max_decode_length=max_decode_length, shardings=self.partitioner)
    return jax.jit(step, in_shardings=(self.param_shardings, caches, data, data, data),
                   out_shardings=(data, caches), donate_argnums=(1,))

  def predict(self, inputs: np.ndarray, max_decode_length: int, beam_size: int = 1,
              alpha: float = 0.6, eos_id: int = 1) -> np.ndarray:
    """Tokens [batch, max_decode_length] of inputs int32 [batch, inputs_len] (the same global
    batch on every host): greedy, or the best beam of beam search with length penalty
    `alpha`. Tokens after EOS are 0. A batch that `Partitioner.decode_batch_multiple` does
    not divide is padded with copies of its first row, whose tokens are dropped."""
    decode = self.decode_program(max_decode_length, beam_size, alpha, eos_id)
    padded = _pad_rows(inputs, self.partitioner.decode_batch_multiple)
    tokens = decode(self.params, _global(padded, self.partitioner.batch_sharding()))
    return _to_host(tokens)[:len(inputs)]

  def per_example_loss(self, batch: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """([batch] mean cross entropy per target token, [batch] target tokens) of a batch of
    feature-converted int32 arrays [batch, length] (the same on every host), teacher forced
    (`EncoderDecoderModel.per_example_loss`). A batch that the data-parallel size does not
    divide is padded with empty rows, dropped from the result."""
    if "loss" not in self._decoders:
      data = self.partitioner.batch_sharding()
      self._decoders["loss"] = jax.jit(self.model.per_example_loss,
                                       in_shardings=(self.param_shardings, data),
                                       out_shardings=data)
    rows = len(next(iter(batch.values())))
    missing = -rows % self.partitioner.data_parallel_size
    sharding = self.partitioner.batch_sharding()
    padded = {name: _global(np.pad(np.asarray(value, np.int32), ((0, missing), (0, 0))),
                            sharding) for name, value in batch.items()}
    loss, tokens = self._decoders["loss"](self.params, padded)
    return _to_host(loss)[:rows], _to_host(tokens)[:rows]

  def decode_cache(self, inputs: np.ndarray, max_decode_length: int) -> Any:
    """The decode cache of `inputs` as `predict` lays it out (global arrays), for inspection."""
    prefill = self.prefill_program(max_decode_length)
    return prefill(self.params, _global(np.asarray(inputs, np.int32),
                                        self.partitioner.batch_sharding()))[1]


def from_host_params(model: EncoderDecoderModel, params: Any, partitioner: Partitioner,
                     dtype: Optional[str] = None, cpu_kernels: bool = False) -> Predictor:
  """A Predictor of numpy params held whole by every host (small models, tests)."""
  dtype = jnp.dtype(dtype or model.config.dtype)
  shardings = param_shardings(partitioner, model.config)
  placed = jax.tree.map(lambda x, s: _global(np.asarray(x, dtype), s), params, shardings)
  return Predictor(model, placed, partitioner, cpu_kernels)

