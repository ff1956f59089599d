"""The paper's claims (Ainslie et al. 2023, section 3, Figures 3-6) as measures with verdicts.

Each claim is declared before any run: a statistic of the means of named measurements, the
direction the paper reports and a threshold. Measurements are per-example samples
`[seeds, examples]` keyed by name: `heldout/<variant key>` is a variant's held-out loss on
the pre-training task (the same examples and seeds for every variant, so comparisons are
paired; a deterministic variant's rows are the same for every seed), `test/<task>/<key>` a
fine-tuned variant's loss on the task's scored test examples, and `time/g<G>`
(`time-kv-bound/g<G>`) the timed repeats of decoding with G key/value heads. `evaluate`
gives each claim its estimate, 95% bootstrap interval (`statistics.bootstrap`) and verdict
(`statistics.verdict`); a claim whose measurements the run lacks is 'not run', naming them.
"""
import dataclasses
import os
from typing import Callable, Dict, List, Mapping, Sequence, Tuple

import numpy as np
from etils import epath

from gqa_flax.reproduce import statistics
from gqa_flax.reproduce.presets import Variant
from gqa_flax.storage import write_json

UPTRAINED = 0.05  # the paper's alpha


@dataclasses.dataclass(frozen=True)
class Claim:
  id: str
  statement: str
  measure: str  # the statistic, written out
  needs: Tuple[str, ...]  # measurement names, the statistic's arguments in order
  statistic: Callable[..., np.ndarray]
  paper_direction: str  # '<' or '>': the statistic's side of `threshold` the paper reports
  threshold: float
  paired: bool = True


def heldout(model: str, kv_heads=None, alpha: float = UPTRAINED, method: str = "mean") -> str:
  return f"heldout/{Variant(model, kv_heads, alpha, method).key}"


def timing(groups: int, kv_bound: bool = False) -> str:
  """Figure 6's timed repeats with G groups: of the reproduction's model (`time/gG`), or of
  the key/value-bound shape with random weights (`time-kv-bound/gG`)."""
  return f"time{'-kv-bound' if kv_bound else ''}/g{groups}"


def _gap_ratio(a, b, c):
  """(a - b) / (c - b)."""
  return (a - b) / (c - b)


def paper_claims(model: str, smaller_model: str, gqa_groups: int, mid_groups: int,
                 num_heads: int, kv_bound: bool = False) -> List[Claim]:
  """C1-C6 for `model` (the uptrained one; `smaller_model`: the smaller MHA model of C6),
  GQA-`gqa_groups`, and Figure 6's `mid_groups` between 1 and `num_heads`; the speed claims
  (C1s, C5) on the key/value-bound shape's timings when `kv_bound`."""
  mha, gqa = heldout(model), heldout(model, gqa_groups)
  mqa, mqa_0, gqa_0 = heldout(model, 1), heldout(model, 1, 0.0), heldout(model, gqa_groups, 0.0)
  shape = "the key/value-bound shape" if kv_bound else f"the {model} model"

  def time_gap(groups: int) -> Tuple[str, Tuple[str, ...]]:
    """The measure and measurements of (T_groups - T_1) / (T_H - T_1)."""
    return (f"(T_{groups} - T_1) / (T_{num_heads} - T_1)",
            tuple(timing(g, kv_bound) for g in (groups, 1, num_heads)))

  return [
      Claim("C1", f"uptrained GQA-{gqa_groups}'s loss gap to MHA is a small fraction of "
            "uptrained MQA's (Table 1, Fig. 3)", "(L_GQA - L_MHA) / (L_MQA - L_MHA)",
            (gqa, mha, mqa), _gap_ratio, "<", 0.5),
      Claim("C1s", f"GQA-{gqa_groups} decodes at a speed close to MQA's: its extra time over MQA "
            f"is a small fraction of MHA's (Table 1, Fig. 3; timed on {shape})",
            *time_gap(gqa_groups), _gap_ratio, "<", 0.5, paired=False),
      Claim("C2", f"uptraining MQA for alpha = {UPTRAINED} recovers most of what conversion "
            "lost (Fig. 5)", "(L_MQA,a=0 - L_MQA) / (L_MQA,a=0 - L_MHA)",
            (mqa_0, mqa, mha), lambda m0, m, h: (m0 - m) / (m0 - h), ">", 0.5),
      Claim("C2b", "returns diminish: uptraining MQA from alpha = 0.05 to 0.1 gains less than "
            "from 0 to 0.05 (Fig. 5)", "(L_MQA,a=0.05 - L_MQA,a=0.1) / (L_MQA,a=0 - L_MQA,a=0.05)",
            (mqa, heldout(model, 1, 0.1), mqa_0), lambda m5, m10, m0: (m5 - m10) / (m0 - m5),
            "<", 1.0),
      Claim("C3a", "mean pooling beats keeping the first head (Fig. 4)",
            "L_MQA,first - L_MQA,mean", (heldout(model, 1, method="first"), mqa),
            lambda first, mean: first - mean, ">", 0.0),
      Claim("C3b", "keeping the first head beats random initialisation (Fig. 4)",
            "L_MQA,random - L_MQA,first", (heldout(model, 1, method="random"),
                                            heldout(model, 1, method="first")),
            lambda random, first: random - first, ">", 0.0),
      Claim("C4", f"right after conversion (alpha = 0) GQA-{gqa_groups} is close to MHA while "
            "MQA is not (Fig. 5)", "(L_GQA,a=0 - L_MHA) / (L_MQA,a=0 - L_MHA)",
            (gqa_0, mha, mqa_0), _gap_ratio, "<", 0.5),
      Claim("C5", f"time per sample grows modestly from G = 1 to G = {mid_groups} and steeply "
            f"towards G = {num_heads} (Fig. 6; timed on {shape})",
            *time_gap(mid_groups), _gap_ratio, "<", 0.5, paired=False),
      Claim("C6", f"uptrained MQA-{model} beats MHA-{smaller_model} in quality (Fig. 3)",
            f"L_MHA-{smaller_model} - L_MQA-{model}", (heldout(smaller_model), mqa),
            lambda small, big: small - big, ">", 0.0),
  ]


# Conversions beyond the paper, each against mean pooling: method -> (claim ids, what it does).
BEYOND_MEAN = {"grouped": (("E1", "E2"), "grouping alike heads before pooling"),
               "aligned": (("E3", "E4"), "aligning heads by orthogonal rotations and grouping "
                           "alike heads before pooling")}


def conversion_claims(model: str, groups: int, method: str = "grouped") -> List[Claim]:
  """Beyond the paper (`gqa-convert --method grouped|aligned`): `method` against mean-pooling
  neighbouring key/value heads, GQA-`groups` of `model`, right after conversion and after
  uptraining."""
  ids, does = BEYOND_MEAN[method]
  claims = []
  for claim_id, alpha, when in zip(ids, (0.0, UPTRAINED), (
      "right after conversion", f"after uptraining for alpha = {UPTRAINED}")):
    other = heldout(model, groups, alpha, method)
    mean = heldout(model, groups, alpha)
    claims.append(Claim(
        claim_id, f"beyond the paper: {does} (--method {method}) beats mean-pooling "
        f"neighbouring heads, GQA-{groups} {when}",
        f"L_GQA,mean,a={alpha:g} - L_GQA,{method},a={alpha:g}", (mean, other),
        lambda mean, other: mean - other, ">", 0.0))
  return claims


def preset_claims(preset) -> List[Claim]:
  """C1-C6 for a reproduction preset: its Table 1 GQA variant's model and groups (the largest
  G below the heads among the table's variants, else among all), another model's MHA for C6,
  Figure 6's groups; with uptrained `grouped` (`aligned`) variants, E1-E2 (E3-E4) on the GQA
  variant's groups (else the first such variant's)."""
  is_gqa = lambda v: v.kv_heads not in (None, 1)
  candidates = [v for v in preset.table_variants if is_gqa(v)] or [
      v for v in preset.variants if is_gqa(v)]
  gqa = max(candidates, key=lambda v: v.kv_heads, default=None)
  model = gqa.model if gqa else preset.variants[0].model
  smaller = next((v.model for v in preset.variants
                  if v.kv_heads is None and v.model != model), "smaller")
  groups = sorted(preset.fig6["groups"])
  mid = 8 if 8 in groups[1:-1] else groups[len(groups) // 2]
  claims = paper_claims(model, smaller, gqa.kv_heads if gqa else 8, mid, groups[-1],
                        kv_bound=bool(preset.fig6_kv_bound))
  for method in BEYOND_MEAN:
    beyond = [v for v in preset.variants if v.method == method and v.alpha == UPTRAINED]
    if beyond:
      chosen = next((v for v in beyond if gqa and v.kv_heads == gqa.kv_heads), beyond[0])
      claims += conversion_claims(chosen.model, chosen.kv_heads, method)
  return claims


def test_loss(task: str, variant_key: str) -> str:
  return f"test/{task}/{variant_key}"


def measurements(records: Mapping[str, Dict]) -> Dict[str, np.ndarray]:
  """{name: [seeds, n]} from the stages' results: the held-out losses (`heldout/<key>/s<seed>`
  rows stacked in seed order under `heldout/<key>`), the fine-tuned models' test losses
  (evaluate's `<key>-s<seed>` under `test/<task>/<key>`) and Figure 6's timings
  ([1, repeats])."""
  by_seed: Dict[str, Dict[int, list]] = {}
  heldout_result = (records.get("heldout") or {}).get("result") or {}
  for name, losses in heldout_result.get("losses", {}).items():
    variant, _, seed = name.rpartition("/s")
    by_seed.setdefault(variant, {})[int(seed)] = losses
  evaluated = ((records.get("evaluate") or {}).get("result") or {}).get("variants", {})
  for name, result in evaluated.items():
    variant, _, seed = name.rpartition("-s")
    for task, scored in result["tasks"].items():
      if "test_losses" in scored:
        by_seed.setdefault(test_loss(task, variant), {})[int(seed)] = scored["test_losses"]
  found = {name: np.asarray([rows[s] for s in sorted(rows)], np.float64)
           for name, rows in by_seed.items()}
  for stage, kv_bound in (("fig6-timing", False), ("fig6-timing-kv-bound", True)):
    for point in ((records.get(stage) or {}).get("result") or {}).get("points", []):
      if point.get("t_infer_repeats_s"):
        found[timing(point["kv_heads"], kv_bound)] = np.asarray(point["t_infer_repeats_s"])[None]
  return found


def evaluate(claim: Claim, measurements: Mapping[str, np.ndarray], seed: int = 0) -> Dict:
  """The claims.json entry of `claim` over `measurements` ({name: [seeds, examples]})."""
  entry = {"id": claim.id, "statement": claim.statement, "measure": claim.measure,
           "paper_direction": claim.paper_direction, "threshold": claim.threshold}
  missing = [name for name in claim.needs if name not in measurements]
  if missing:
    return {**entry, "estimate": None, "ci95": None, "verdict": "not run",
            "missing": missing}
  interval = statistics.bootstrap(claim.statistic, [measurements[n] for n in claim.needs],
                                  paired=claim.paired, seed=seed)
  return {**entry, "estimate": interval.estimate, "ci95": [interval.low, interval.high],
          "verdict": statistics.verdict(interval, claim.paper_direction, claim.threshold)}


def _markdown(preset: str, entries: Sequence[Dict]) -> str:
  lines = [f"# The paper's claims: preset `{preset}`", "",
           "| claim | statement | measure | paper | estimate | 95% interval | verdict |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for e in entries:
    interval = "-" if e["ci95"] is None else f"[{e['ci95'][0]:.4g}, {e['ci95'][1]:.4g}]"
    estimate = "-" if e["estimate"] is None else f"{e['estimate']:.4g}"
    verdict = e["verdict"] + (f" (needs {', '.join(e['missing'])})" if "missing" in e else "")
    lines.append(f"| {e['id']} | {e['statement']} | {e['measure']} | "
                 f"{e['paper_direction']} {e['threshold']:g} | {estimate} | {interval} | "
                 f"{verdict} |")
  return "\n".join(lines) + "\n"


def write_claims(out_dir: str, preset: str, claims: Sequence[Claim],
                 measurements: Mapping[str, np.ndarray], seed: int = 0) -> List[Dict]:
  """Writes OUT/claims.json and OUT/claims.md; returns the entries."""
  entries = [evaluate(claim, measurements, seed) for claim in claims]
  write_json(os.path.join(out_dir, "claims.json"), {"preset": preset, "claims": entries})
  epath.Path(out_dir, "claims.md").write_text(_markdown(preset, entries))
  return entries
