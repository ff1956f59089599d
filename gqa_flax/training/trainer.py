"""Train state, the jit-able train and eval steps, and their shardings (T5X `trainer.py`).

Everything here is pure and works on abstract values, so a planner can lower the train step
for a TPU topology from ShapeDtypeStructs:

  boxed = abstract_params(model, input_shapes)                 # eval_shape: no allocation
  shardings = state_shardings(partitioner, optimizer, boxed)
  state = abstract_train_state(optimizer, boxed, shardings)
  step = jit_train_step(partitioner, make_train_step(model, optimizer, lr_fn), shardings)
  step.lower(state, batch_structs)                             # batch: ShapeDtypeStructs
"""
from typing import Any, Callable, Dict, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner

Batch = Dict[str, jax.Array]
Metrics = Dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """step: int32 scalar (global step); params: float32 tree; param_states: optimizer state."""
  step: jax.Array
  params: Any
  param_states: Any


def abstract_params(model: EncoderDecoderModel, input_shapes: Dict[str, Tuple[int, ...]]) -> Any:
  """LogicallyPartitioned ShapeDtypeStructs of the params; allocates nothing."""
  return jax.eval_shape(lambda rng: model.init(rng, input_shapes), jax.random.key(0))


def state_shardings(partitioner: Partitioner, optimizer: optax.GradientTransformation,
                    boxed_params: Any) -> TrainState:
  """NamedShardings of every leaf of the TrainState."""
  params = nn.meta.unbox(boxed_params)
  param_shardings = partitioner.param_shardings(boxed_params)
  param_states = jax.eval_shape(optimizer.init, params)
  return TrainState(step=partitioner.replicated(), params=param_shardings,
                    param_states=partitioner.opt_state_shardings(param_states, params,
                                                                 param_shardings))


def abstract_train_state(optimizer: optax.GradientTransformation, boxed_params: Any,
                         shardings: TrainState) -> TrainState:
  """ShapeDtypeStructs (with shardings) of the TrainState."""
  params = nn.meta.unbox(boxed_params)
  state = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                     param_states=jax.eval_shape(optimizer.init, params))
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      state, shardings)


def init_train_state(model: EncoderDecoderModel, optimizer: optax.GradientTransformation,
                     input_shapes: Dict[str, Tuple[int, ...]], shardings: TrainState,
                     seed: int) -> TrainState:
  """Fresh params (from `seed`) and optimizer state, created directly in their shardings."""
  def init(rng):
    params = nn.meta.unbox(model.init(rng, input_shapes))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      param_states=optimizer.init(params))
  return jax.jit(init, out_shardings=shardings)(jax.random.key(seed))


def make_train_step(model: EncoderDecoderModel, optimizer: optax.GradientTransformation,
                    learning_rate_fn: Callable[[jax.Array], jax.Array], dropout_seed: int = 0
                    ) -> Callable[[TrainState, Batch], Tuple[TrainState, Metrics]]:
  """(state, batch) -> (state after one Adafactor step, metrics). Pure; jit it.

  Dropout keys are folded from `dropout_seed` and the step, so a resumed run draws the same
  masks. Dropout is on only when the config's dropout_rate is positive.
  """
  use_dropout = model.config.dropout_rate > 0

  def train_step(state: TrainState, batch: Batch) -> Tuple[TrainState, Metrics]:
    rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step) if use_dropout else None
    grad_fn = jax.value_and_grad(model.loss_fn, has_aux=True)
    (_, metrics), grads = grad_fn(state.params, batch, rng)
    updates, param_states = optimizer.update(grads, state.param_states, state.params)
    learning_rate = learning_rate_fn(state.step)
    updates = jax.tree.map(lambda u: learning_rate * u, updates)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, learning_rate=learning_rate)
    return TrainState(step=state.step + 1, params=params, param_states=param_states), metrics

  return train_step


def jit_train_step(partitioner: Partitioner, train_step: Callable, shardings: TrainState
                   ) -> Callable[[TrainState, Batch], Tuple[TrainState, Metrics]]:
  """`train_step` compiled with state/batch shardings; the input state's buffers are donated."""
  return jax.jit(train_step, in_shardings=(shardings, partitioner.batch_sharding()),
                 out_shardings=(shardings, partitioner.replicated()), donate_argnums=(0,))


def make_eval_step(model: EncoderDecoderModel) -> Callable[[Any, Batch], Metrics]:
  """(params, batch) -> metrics without dropout (T5X's eval_step)."""
  def eval_step(params: Any, batch: Batch) -> Metrics:
    return model.loss_fn(params, batch, None)[1]
  return eval_step
