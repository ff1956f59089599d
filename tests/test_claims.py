"""The statistics of the claims against hand-computed references, and the verdict rule."""
import json

import numpy as np
import pytest

from gqa_flax.reproduce import claims, statistics
from gqa_flax.reproduce.presets import load_preset
from gqa_flax.reproduce.statistics import Interval


def _numpy_interval(values, seeds, examples):
  """The percentile interval computed by hand from the same resamples."""
  means = [np.mean([values[seed_row[s], example_rows[s, e]] for s in range(seeds.shape[1])
                    for e in range(example_rows.shape[1])])
           for seed_row, example_rows in zip(seeds, examples)]
  return np.percentile(means, [2.5, 97.5])


def test_the_mean_interval_is_numpys_percentile_of_the_same_resamples():
  x = np.array([2.0, 4.0, 4.0, 5.0, 7.0, 9.0, 1.0, 3.0])
  interval = statistics.bootstrap(lambda m: m, [x], replicates=300, seed=7)
  seeds, examples = statistics.resample_indices(1, 8, 300, np.random.default_rng(7))
  np.testing.assert_allclose([interval.low, interval.high],
                             _numpy_interval(x[None], seeds, examples))
  assert interval.estimate == pytest.approx(4.375)
  assert (seeds == 0).all() and examples.shape == (300, 1, 8) and examples.max() < 8


def test_a_paired_difference_resamples_the_same_examples_for_both():
  rng = np.random.default_rng(0)
  shared = rng.normal(0, 5, 200)  # per-example difficulty, seen by both variants
  a, b = shared + 1.0 + rng.normal(0, 0.1, 200), shared + rng.normal(0, 0.1, 200)
  paired = statistics.bootstrap(lambda u, v: u - v, [a, b], replicates=500, seed=1)
  seeds, examples = statistics.resample_indices(1, 200, 500, np.random.default_rng(1))
  np.testing.assert_allclose([paired.low, paired.high],
                             _numpy_interval((a - b)[None], seeds, examples))
  unpaired = statistics.bootstrap(lambda u, v: u - v, [a, b], paired=False, seed=1)
  assert paired.high - paired.low < 0.1 < unpaired.high - unpaired.low  # difficulty cancels
  assert paired.low > 0.95 and paired.high < 1.05


def test_a_ratio_of_paired_differences():
  gqa, mha, mqa = np.array([2.2, 3.1, 4.2]), np.array([2.0, 3.0, 4.0]), np.array([3.0, 4.0, 5.0])
  gap_ratio = lambda a, b, c: (a - b) / (c - b)
  interval = statistics.bootstrap(gap_ratio, [gqa, mha, mqa], replicates=400, seed=3)
  assert interval.estimate == pytest.approx((3.1666667 - 3.0) / (4.0 - 3.0))
  seeds, examples = statistics.resample_indices(1, 3, 400, np.random.default_rng(3))
  by_hand = [(gqa[e].mean() - mha[e].mean()) / (mqa[e].mean() - mha[e].mean())
             for e in examples[:, 0]]
  np.testing.assert_allclose([interval.low, interval.high], np.percentile(by_hand, [2.5, 97.5]))


def test_seeds_are_resampled_then_the_examples_within_each():
  values = np.array([[1.0, 2.0, 3.0], [10.0, 20.0, 30.0]])  # two seeds, three examples
  interval = statistics.bootstrap(lambda m: m, [values], replicates=300, seed=5)
  seeds, examples = statistics.resample_indices(2, 3, 300, np.random.default_rng(5))
  np.testing.assert_allclose([interval.low, interval.high],
                             _numpy_interval(values, seeds, examples))
  assert seeds.shape == (300, 2) and set(np.unique(seeds)) == {0, 1}
  # Replicates that drew seed 0 twice average 2, seed 1 twice 20: the seeds' spread shows.
  assert interval.low < 6 and interval.high > 15


@pytest.mark.parametrize("interval, direction, expected", [
    (Interval(0.2, 0.1, 0.3), "<", "reproduced"), (Interval(0.2, 0.1, 0.3), ">", "contradicted"),
    (Interval(0.8, 0.6, 0.9), "<", "contradicted"), (Interval(0.8, 0.6, 0.9), ">", "reproduced"),
    (Interval(0.5, 0.4, 0.7), "<", "inconclusive"), (Interval(0.5, 0.4, 0.7), ">", "inconclusive"),
    (Interval(0.3, 0.2, 0.5), "<", "inconclusive"),  # touching the threshold is not beyond it
    (Interval(0.3, float("nan"), float("nan")), "<", "inconclusive")])
def test_the_verdict_rule(interval, direction, expected):
  assert statistics.verdict(interval, direction, 0.5) == expected


def test_claims_json_entries_and_a_claim_whose_variants_are_missing(tmp_path):
  rng = np.random.default_rng(0)
  base = rng.normal(3.0, 1.0, (2, 300))  # 2 seeds x 300 held-out examples
  measurements = {claims.heldout("tiny"): base,
                  claims.heldout("tiny", 2): base + 0.05 + rng.normal(0, 0.01, base.shape),
                  claims.heldout("tiny", 1): base + 0.5 + rng.normal(0, 0.01, base.shape)}
  entries = claims.write_claims(str(tmp_path), "unit",
                                claims.paper_claims("tiny", "small", 2, 2, 4), measurements)
  written = json.loads((tmp_path / "claims.json").read_text())
  assert written == {"preset": "unit", "claims": entries}
  by_id = {entry["id"]: entry for entry in entries}
  assert set(by_id) == {"C1", "C1s", "C2", "C2b", "C3a", "C3b", "C4", "C5", "C6"}
  c1 = by_id["C1"]
  assert c1["verdict"] == "reproduced" and c1["estimate"] == pytest.approx(0.1, abs=0.01)
  assert c1["ci95"][0] < c1["estimate"] < c1["ci95"][1] < 0.5
  assert by_id["C4"] == {**by_id["C4"], "verdict": "not run", "estimate": None, "ci95": None,
                         "missing": ["heldout/tiny-gqa2-a0-mean", "heldout/tiny-mqa-a0-mean"]}
  for entry in entries:  # each verdict follows from its interval
    if entry["ci95"] is not None:
      assert entry["verdict"] == statistics.verdict(Interval(entry["estimate"], *entry["ci95"]),
                                                    entry["paper_direction"], entry["threshold"])
  assert "| C4 |" in (tmp_path / "claims.md").read_text()


def test_measurements_stack_each_variants_seeds_in_seed_order():
  records = {"heldout": {"result": {"losses": {"heldout/tiny-mha/s1": [3.0, 4.0],
                                               "heldout/tiny-mha/s0": [1.0, 2.0]}}},
             "fig6-timing": {"result": {"points": [{"kv_heads": 2, "t_infer_repeats_s": [5, 6]}]}}}
  found = claims.measurements(records)
  assert set(found) == {"heldout/tiny-mha", "time/g2"}
  np.testing.assert_array_equal(found["heldout/tiny-mha"], [[1.0, 2.0], [3.0, 4.0]])
  np.testing.assert_array_equal(found["time/g2"], [[5, 6]])


@pytest.mark.parametrize("method,ids", [("grouped", ("E1", "E2")), ("aligned", ("E3", "E4"))])
def test_beyond_mean_claims_compare_with_mean_pooling_and_only_where_a_preset_has_them(
    method, ids):
  rng = np.random.default_rng(1)
  base = rng.normal(4.0, 1.0, (3, 200))
  measurements = {claims.heldout("mini", 2, 0.0): base + 0.3,
                  claims.heldout("mini", 2, 0.0, method):
                      base + 0.2 + rng.normal(0, .01, base.shape),
                  claims.heldout("mini", 2): base + 0.1,
                  claims.heldout("mini", 2, method=method):
                      base + 0.1 + rng.normal(0, .01, base.shape)}
  first, second = (claims.evaluate(c, measurements)
                   for c in claims.conversion_claims("mini", 2, method))
  assert (first["id"], second["id"]) == ids
  assert first["measure"] == f"L_GQA,mean,a=0 - L_GQA,{method},a=0"
  assert first["verdict"] == "reproduced" and first["estimate"] == pytest.approx(0.1, abs=0.01)
  assert second["verdict"] == "inconclusive" and abs(second["estimate"]) < 0.01
  mini = {c.id: c for c in claims.preset_claims(load_preset("mini"))}
  assert mini[ids[0]].needs == ("heldout/mini-gqa2-a0-mean", f"heldout/mini-gqa2-a0-{method}")
  assert mini[ids[1]].needs == ("heldout/mini-gqa2-a0.05-mean",
                                f"heldout/mini-gqa2-a0.05-{method}")
  assert not set(ids) & {c.id for c in claims.preset_claims(load_preset("smoke"))}
