"""Optimizer, schedule and loss against independent references: a numpy transcription of T5X's
Adafactor update (t5x/adafactor.py), hand-computed learning rates, numpy cross entropy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gqa_flax.training import adafactor, losses, schedules

EPSILON1, EPSILON2, DECAY_RATE, CLIP = 1e-30, 1e-3, 0.8, 1.0


def _t5x_adafactor_step(param, grad, slots, t, learning_rate):
  """One T5X Adafactor update (beta1=None, factored, parameter scale, clipping) in float64.

  slots: {'v_row', 'v_col'} for a factored matrix (rows: the larger dim 0 here), {'v'} otherwise;
  t: 1-based step, beta2_t = 1 - t^-0.8.
  """
  decay = 1.0 - t ** -DECAY_RATE
  scale = learning_rate * max(np.sqrt(np.mean(param ** 2)), EPSILON2)
  grad_sqr = grad ** 2 + EPSILON1
  if "v_row" in slots:
    v_row = decay * slots["v_row"] + (1 - decay) * grad_sqr.mean(axis=1)
    v_col = decay * slots["v_col"] + (1 - decay) * grad_sqr.mean(axis=0)
    row_factor = (v_row / v_row.mean()) ** -0.5
    update = grad * row_factor[:, None] * (v_col ** -0.5)[None, :]
    slots = {"v_row": v_row, "v_col": v_col}
  else:
    v = decay * slots["v"] + (1 - decay) * grad_sqr
    update = grad * v ** -0.5
    slots = {"v": v}
  update /= max(1.0, np.sqrt(np.mean(update ** 2)) / CLIP)
  return param - scale * update, slots


def test_adafactor_matches_t5x_update_for_three_steps():
  rng = np.random.default_rng(0)
  params = {"matrix": rng.normal(size=(256, 130)), "vector": rng.normal(size=(130,)) * 1e-4,
            "small": rng.normal(size=(64, 130))}  # 64 < 128: not factored
  grads = [{k: rng.normal(size=v.shape) * (1 + 3 * i) for k, v in params.items()}
           for i in range(3)]
  assert adafactor.factored_dims((256, 130)) == (1, 0)
  assert adafactor.factored_dims((64, 130)) is None and adafactor.factored_dims((130,)) is None
  learning_rate = 0.01
  optimizer = adafactor.adafactor()
  ours = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = optimizer.init(ours)
  reference = dict(params)
  slots = {"matrix": {"v_row": np.zeros(256), "v_col": np.zeros(130)},
           "vector": {"v": np.zeros(130)}, "small": {"v": np.zeros((64, 130))}}
  for t, grad in enumerate(grads, start=1):
    updates, state = optimizer.update(jax.tree.map(jnp.float32, grad), state, ours)
    ours = optax.apply_updates(ours, jax.tree.map(lambda u: learning_rate * u, updates))
    for name in params:
      reference[name], slots[name] = _t5x_adafactor_step(reference[name], grad[name],
                                                         slots[name], t, learning_rate)
    for name, initial in params.items():  # the displacement, to float32 rounding of the param
      moved = reference[name] - initial
      assert np.abs(moved).max() > 1e3 * np.finfo(np.float32).eps * np.abs(initial).max()
      np.testing.assert_allclose(np.asarray(ours[name], np.float64) - initial, moved, rtol=1e-4,
                                 atol=4 * np.finfo(np.float32).eps * np.abs(initial).max(),
                                 err_msg=f"{name} at step {t}")


@pytest.mark.parametrize("step,rate", [(0, 0.01), (100, 0.01), (10_000, 0.01), (40_000, 0.005),
                                       (1_000_000, 0.001)])
def test_t5_1_1_pretraining_schedule(step, rate):
  schedule = schedules.create_learning_rate_scheduler("constant * rsqrt_decay", 1.0, 10_000)
  assert float(schedule(step)) == pytest.approx(rate, rel=1e-6)


def test_finetuning_and_warmup_schedules():
  assert float(schedules.create_learning_rate_scheduler("constant", 0.001)(123_456)) == \
      pytest.approx(0.001)
  warmup = schedules.create_learning_rate_scheduler("constant * linear_warmup * rsqrt_decay",
                                                     0.5, 1000)
  assert float(warmup(250)) == pytest.approx(0.5 * 0.25 / np.sqrt(1000), rel=1e-6)
  assert float(warmup(4000)) == pytest.approx(0.5 / 63.245553203367585, rel=1e-6)
  with pytest.raises(ValueError, match="unknown learning-rate factor"):
    schedules.create_learning_rate_scheduler("constant * cosine")


def _numpy_cross_entropy(logits, targets, weights, label_smoothing, z_loss):
  """Summed sum_v -q(v) log p(v) - H(q) + z_loss * logsumexp^2 over weighted tokens."""
  vocab = logits.shape[-1]
  log_z = np.log(np.exp(logits).sum(-1))
  log_p = logits - log_z[..., None]
  low = label_smoothing / (vocab - 1)
  q = np.full(logits.shape, low)
  np.put_along_axis(q, targets[..., None], 1.0 - label_smoothing, axis=-1)
  entropy = -(q * np.log(np.where(q > 0, q, 1.0))).sum(-1)
  per_token = -(q * log_p).sum(-1) - entropy + z_loss * log_z ** 2
  return (per_token * weights).sum(), (z_loss * log_z ** 2 * weights).sum()


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("factor", [None, 233472.0, losses.NUM_REAL_TARGET_TOKENS])
def test_cross_entropy_with_z_loss(label_smoothing, factor):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 5, 11)) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  weights = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.float64)
  loss, z_part, weight_sum = losses.compute_weighted_cross_entropy(
      jnp.float32(logits), jnp.int32(targets), jnp.float32(weights), label_smoothing, 1e-4,
      factor)
  expected, expected_z = _numpy_cross_entropy(logits, targets, weights, label_smoothing, 1e-4)
  divisor = {None: 1.0, losses.NUM_REAL_TARGET_TOKENS: 7.0}.get(factor, factor)
  assert float(weight_sum) == 7.0
  assert float(loss) == pytest.approx(expected / divisor, rel=1e-5)
  assert float(z_part) == pytest.approx(expected_z / divisor, rel=1e-5)
  if label_smoothing == 0:
    assert expected - expected_z == pytest.approx(
        sum(np.log(np.exp(logits[b, i]).sum()) - logits[b, i, targets[b, i]]
            for b in range(2) for i in range(5) if weights[b, i]), rel=1e-12)
