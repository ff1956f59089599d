"""`--method grouped` and `aligned`: permuting (and rotating) the decoder's attention heads is
exact on the multi-head model, the groups are balanced, and pooling alike (aligned) heads
loses less than pooling neighbours."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from gqa_flax import checkpoints
from gqa_flax.checkpoints import align
from gqa_flax.checkpoints.arrays import flatten, in_memory, unflatten
from gqa_flax.checkpoints.convert import (balanced_groups, convert_arrays, head_permutations,
                                          kv_head_cosines, mean_pool_kv, permute_heads)
from gqa_flax.checkpoints.reader import CheckpointSource, open_checkpoint
from gqa_flax.convert import main
from gqa_flax.models import Transformer, t5_1_1_config
from test_convert import T5X_TINY

CONFIG = t5_1_1_config("tiny", dtype="float32", vocab_size=40, num_heads=4, head_dim=3,
                       num_decoder_layers=2)
INPUTS, DECODER_INPUTS, TARGETS = (jnp.array([[3, 7, 9, 12, 1]]), jnp.array([[0, 5, 6, 8]]),
                                   jnp.array([[5, 6, 8, 1]]))


def _mha_params(seed=1):
  params = Transformer(CONFIG).init(jax.random.PRNGKey(seed), INPUTS, DECODER_INPUTS)["params"]
  return {name: np.asarray(value) for name, value in flatten(meta.unbox(params)).items()}


def _logits(config, flat):
  return np.asarray(Transformer(config).apply({"params": unflatten(flat)}, INPUTS,
                                              DECODER_INPUTS, TARGETS))


def _source(flat, config=CONFIG):
  return CheckpointSource("memory", "test", config, {n: in_memory(a) for n, a in flat.items()})


def test_balanced_groups_put_alike_heads_together():
  # Heads 0 and 2 alike, 1 and 3 alike: groups (0, 2) and (1, 3).
  similarity = np.array([[1.0, 0.1, 0.9, 0.0], [0.1, 1.0, 0.2, 0.8],
                         [0.9, 0.2, 1.0, 0.1], [0.0, 0.8, 0.1, 1.0]])
  np.testing.assert_array_equal(balanced_groups(similarity, 2), [0, 2, 1, 3])
  np.testing.assert_array_equal(balanced_groups(similarity, 4), [0, 1, 2, 3])
  np.testing.assert_array_equal(np.sort(balanced_groups(similarity, 1)), np.arange(4))
  rng = np.random.default_rng(0)
  for heads, groups in ((8, 2), (8, 4), (12, 3), (16, 4)):
    a = rng.normal(size=(heads, heads))
    permutation = balanced_groups(a + a.T, groups)
    # Every head in exactly one contiguous block of heads / groups: the groups are balanced.
    np.testing.assert_array_equal(np.sort(permutation), np.arange(heads))


def test_permuting_heads_alone_keeps_the_multi_head_model_exactly():
  """Random permutations (one for self-attention, shared with its bias table, one per layer
  for cross-attention) applied without pooling give the original logits."""
  flat = _mha_params()
  rng = np.random.default_rng(3)
  permutations = {"self_attention": rng.permutation(4),
                  "encoder_decoder_attention/0": rng.permutation(4),
                  "encoder_decoder_attention/1": rng.permutation(4)}
  permuted = dict(flat)
  for name, value in flat.items():
    if name.startswith("decoder/") and ("attention/" in name or "relpos" in name):
      kind = "self_attention" if "self_attention" in name or "relpos" in name else \
          f"encoder_decoder_attention/{name.split('/')[1].split('_')[1]}"
      permuted[name] = permute_heads(name, in_memory(value), permutations[kind], 3).read()
  assert not np.array_equal(permuted["decoder/relpos_bias/rel_embedding"],
                            flat["decoder/relpos_bias/rel_embedding"])
  np.testing.assert_allclose(_logits(CONFIG, permuted), _logits(CONFIG, flat), rtol=1e-5,
                             atol=1e-5)


def test_grouped_pools_alike_heads_where_mean_pools_neighbours():
  """Heads 2 and 3 made copies of heads 0 and 1 in every decoder attention: grouped GQA-2
  pools each head with its copy and equals the multi-head model; mean pools 0 with 1."""
  flat = _mha_params()
  for name in flat:
    if name.startswith("decoder/layers_") and name.endswith(("/key/kernel", "/value/kernel")):
      heads = flat[name].reshape(len(flat[name]), 4, 3).copy()
      heads[:, 2:] = heads[:, :2]
      flat[name] = heads.reshape(flat[name].shape)
  source = _source(flat)
  config, grouped, permutations = convert_arrays(source, 2, method="grouped")
  assert all(sorted(p[:2]) in ([0, 2], [1, 3]) for p in permutations.values()), permutations
  grouped = {name: array.read() for name, array in grouped.items()}
  np.testing.assert_allclose(_logits(config, grouped), _logits(CONFIG, flat), rtol=1e-5,
                             atol=1e-5)
  _, mean, _ = convert_arrays(source, 2, method="mean")
  mean = {name: array.read() for name, array in mean.items()}
  assert np.abs(_logits(config, mean) - _logits(CONFIG, flat)).max() > 1e-3


def test_grouped_with_one_head_per_group_is_the_source():
  flat = _mha_params(seed=5)
  config, converted, permutations = convert_arrays(_source(flat), 4, method="grouped")
  assert all(np.array_equal(p, np.arange(4)) for p in permutations.values())
  np.testing.assert_allclose(_logits(config, {n: a.read() for n, a in converted.items()}),
                             _logits(CONFIG, flat), rtol=1e-6, atol=1e-6)


def test_grouped_conversion_of_the_real_t5x_checkpoint(tmp_path):
  """gqa-convert --method grouped on the real T5X fixture: K/V kernels are the means of the
  permuted heads; the permutations are in the metadata; self-attention's is shared with the
  decoder's bias table."""
  assert main(["--src", T5X_TINY, "--dst", str(tmp_path / "gqa"), "--num_kv_heads", "2",
               "--method", "grouped"]) == 0
  loaded = checkpoints.load_checkpoint(str(tmp_path / "gqa"))
  source = flatten(checkpoints.load(T5X_TINY)[1])
  permutations = loaded.metadata["head_permutations"]
  assert loaded.metadata["method"] == "grouped"
  assert set(permutations) == {"self_attention", "encoder_decoder_attention/0",
                               "encoder_decoder_attention/1"}
  assert permutations == {kind: order.tolist() for kind, order in head_permutations(
      open_checkpoint(T5X_TINY), 2, 2).items()}
  params = flatten(loaded.params)
  for name, value in source.items():
    if not name.startswith("decoder/") or not ("attention/" in name or "relpos" in name):
      np.testing.assert_array_equal(params[name], value, err_msg=name)
      continue
    kind = "self_attention" if "self_attention" in name or "relpos" in name else \
        f"encoder_decoder_attention/{name.split('/')[1].split('_')[1]}"
    order = np.asarray(permutations[kind])
    if "relpos" in name:
      np.testing.assert_array_equal(params[name], value[order])
    elif name.endswith("/out/kernel"):
      np.testing.assert_array_equal(params[name], value.reshape(4, 3, -1)[order].reshape(
          value.shape))
    else:
      heads = value.reshape(len(value), 4, 3)[:, order].reshape(value.shape)
      expected = mean_pool_kv(heads, 2, 3) if name.endswith(
          ("/key/kernel", "/value/kernel")) else heads
      np.testing.assert_allclose(params[name], expected, rtol=1e-6, atol=1e-7, err_msg=name)


def test_grouped_refuses_a_source_that_is_not_multi_head(tmp_path, capsys):
  assert main(["--src", T5X_TINY, "--dst", str(tmp_path / "mqa"), "--num_kv_heads", "1"]) == 0
  capsys.readouterr()
  assert main(["--src", str(tmp_path / "mqa"), "--dst", str(tmp_path / "again"),
               "--num_kv_heads", "1", "--method", "grouped"]) == 1
  err = capsys.readouterr().err
  assert "converts a multi-head checkpoint" in err and len(err.strip().splitlines()) == 1
  with pytest.raises(ValueError, match="must be a positive divisor of num_heads=4"):
    convert_arrays(_source(_mha_params()), 3, method="grouped")


# --- aligned: heads rotated onto their group's mean before pooling --------------------------


def _orthogonal(rng, size=3):
  q, r = np.linalg.qr(rng.normal(size=(size, size)))
  return q * np.sign(np.diag(r))


def test_procrustes_recovers_a_rotation_and_minimises_in_the_inputs_metric():
  rng = np.random.default_rng(0)
  a, rotation = rng.normal(size=(20, 3)), _orthogonal(rng)
  np.testing.assert_allclose(align.procrustes(a, a @ rotation), rotation, atol=1e-10)
  # With inputs X (gram = X^T X), the rotation of two kernels [emb, d] minimises
  # ||X A R - X B||: no other orthogonal matrix (here: 200 random ones, and the rotation
  # that is best for the kernels themselves) does better.
  x = rng.normal(size=(50, 6)) * [5, 1, 1, 1, .1, .1]
  kernel_a, kernel_b = rng.normal(size=(2, 6, 3))
  kernel = np.concatenate([kernel_a, kernel_b], axis=1)  # two heads of head_dim 3
  rotations = align.group_rotations(kernel, 1, 3, gram=x.T @ x)
  best = np.linalg.norm(x @ kernel_a @ rotations[0] - x @ kernel_b @ rotations[1])
  relative = rotations[0] @ rotations[1].T  # only A's rotation relative to B's matters
  residual = lambda r: np.linalg.norm(x @ kernel_a @ r - x @ kernel_b)
  assert best == pytest.approx(residual(relative), rel=1e-9)
  others = [_orthogonal(rng) for _ in range(200)] + [align.procrustes(kernel_a, kernel_b)]
  assert best <= min(residual(r) for r in others) + 1e-9


def _rotate_heads(flat, draw):
  """`flat` with every decoder attention's heads rotated: R = draw() ([heads, 3, 3]) on their
  query and key, then P = draw() on their value and P^T on their output rows."""
  rotated = dict(flat)
  for i in range(2):
    for kind in ("self_attention", "encoder_decoder_attention"):
      prefix = f"decoder/layers_{i}/{kind}"
      r, p = draw(), draw()
      for projection, rotations in (("query", r), ("key", r), ("value", p)):
        rotated[f"{prefix}/{projection}/kernel"] = align.rotate_columns(
            flat[f"{prefix}/{projection}/kernel"], rotations)
      rotated[f"{prefix}/out/kernel"] = align.rotate_rows(flat[f"{prefix}/out/kernel"], p)
  return rotated


def _rotated_model(flat, rng):
  """The MHA params with every decoder attention head rotated by a random rotation."""
  return _rotate_heads(flat, lambda: np.stack([_orthogonal(rng) for _ in range(4)]))


def test_rotating_heads_alone_keeps_the_multi_head_model_exactly():
  flat = _mha_params()
  rotated = _rotated_model(flat, np.random.default_rng(1))
  assert not np.allclose(rotated["decoder/layers_0/self_attention/key/kernel"],
                         flat["decoder/layers_0/self_attention/key/kernel"])
  np.testing.assert_allclose(_logits(CONFIG, rotated), _logits(CONFIG, flat), rtol=1e-5,
                             atol=1e-5)


def rotated_copies(seed=2):
  """The MHA params with heads 2 and 3 of every decoder attention made rotated copies of heads
  0 and 1 (their query, key, value and output projections, so each copy computes what its
  head does)."""
  flat, rng = _mha_params(), np.random.default_rng(seed)
  copied = dict(flat)
  for name in flat:
    if name.startswith("decoder/layers_") and "attention/" in name:
      rows = name.endswith("/out/kernel")
      heads = (flat[name].reshape(4, 3, -1) if rows else flat[name].reshape(-1, 4, 3)).copy()
      if rows:
        heads[2:] = heads[:2]
      else:
        heads[:, 2:] = heads[:, :2]
      copied[name] = heads.reshape(flat[name].shape)
  identity = np.eye(3)  # heads 2 and 3 rotated, 0 and 1 kept
  return _rotate_heads(copied, lambda: np.stack([identity, identity, _orthogonal(rng),
                                                 _orthogonal(rng)]))


def test_aligned_pools_rotated_copies_into_the_multi_head_model():
  """Heads 2 and 3 made rotated copies of heads 0 and 1 (`rotated_copies`): aligned GQA-2
  groups each head with its copy, rotates the copy back and equals the multi-head model;
  grouped and mean GQA-2 do not."""
  copied = rotated_copies()
  source = _source(copied)
  expected = _logits(CONFIG, copied)
  config, aligned, permutations = convert_arrays(source, 2, method="aligned")
  assert all(sorted(p[:2]) in ([0, 2], [1, 3]) for p in permutations.values()), permutations
  np.testing.assert_allclose(_logits(config, {n: a.read() for n, a in aligned.items()}),
                             expected, rtol=1e-4, atol=1e-4)
  for method in ("grouped", "mean"):
    _, other, _ = convert_arrays(source, 2, method=method)
    assert np.abs(_logits(config, {n: a.read() for n, a in other.items()}) - expected).max() \
        > 1e-3, method


def test_rotation_invariant_similarity_is_one_for_rotated_copies():
  rng = np.random.default_rng(3)
  head = rng.normal(size=(8, 3))
  kernel = np.concatenate([head, head @ _orthogonal(rng), rng.normal(size=(8, 3))], axis=1)
  similarity = align.rotation_invariant_similarity(kernel, 3)
  np.testing.assert_allclose(similarity, similarity.T, atol=1e-12)
  np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-12)
  assert similarity[0, 1] == pytest.approx(1.0, abs=1e-12) and similarity[0, 2] < 0.99
  assert kv_head_cosines(kernel, 3)[0, 1] < 0.99  # the plain cosine does not see the copy


def test_aligned_with_one_head_per_group_is_the_source_and_written_by_the_cli(tmp_path):
  flat = _mha_params(seed=6)
  config, converted, _ = convert_arrays(_source(flat), 4, method="aligned")
  np.testing.assert_allclose(_logits(config, {n: a.read() for n, a in converted.items()}),
                             _logits(CONFIG, flat), rtol=1e-6, atol=1e-6)
  assert main(["--src", T5X_TINY, "--dst", str(tmp_path / "gqa"), "--num_kv_heads", "2",
               "--method", "aligned"]) == 0
  loaded = checkpoints.load_checkpoint(str(tmp_path / "gqa"))
  assert loaded.metadata["method"] == "aligned" and loaded.config.num_kv_heads == 2
