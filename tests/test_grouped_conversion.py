"""`--method grouped`: permuting the decoder's attention heads is exact on the multi-head
model, the groups are balanced, and pooling alike heads loses less than pooling neighbours."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.linen import meta

from gqa_flax import checkpoints
from gqa_flax.checkpoints.arrays import flatten, in_memory, unflatten
from gqa_flax.checkpoints.convert import (balanced_groups, convert_arrays, head_permutations,
                                          mean_pool_kv, permute_heads)
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
