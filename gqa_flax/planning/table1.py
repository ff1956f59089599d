"""Simulated decoding times: the paper's Table 1 T_infer column and Figure 6 for T5.1.1-XXL.

The paper (section 3.1, "Timing") reports time per sample per TPUv4 chip from xprof, on 8
chips, with the largest batch that fits up to 32 per chip, input 2048 and output 512, and
parallelism tuned per model. Here a model of the hardware replaces the profiler: gqa-eval's
greedy decoding of each model is compiled for the slice in every layout (mesh data x model;
K/V heads the model axis does not divide replicated or batch-partitioned), its prefill and
decode step timed on the chip's roofline from XLA's per-device flops and bytes accessed, and
the fastest layout that fits is kept (decode_plan.search_layouts).
"""
import functools
import math
from typing import Dict, Optional, Sequence, Tuple

from gqa_flax.models import t5_1_1_config
from gqa_flax.planning import decode_plan, report
from gqa_flax.planning.topology import Topology

# Table 1 (s per sample per TPUv4 chip): (name, size, kv heads or None for MHA, paper value).
PAPER_T_INFER = (("MHA-Large", "large", None, 0.37), ("MHA-XXL", "xxl", None, 1.51),
                 ("MQA-XXL", "xxl", 1, 0.24), ("GQA-8-XXL", "xxl", 8, 0.28))
FIGURE6_GROUPS = (1, 4, 8, 16, 32, 64)
# The one layout of the first simulation, kept as a column: Large data-parallel, XXL 8-way
# model parallel over heads, K/V heads that the model axis does not divide replicated.
FIXED_PARTITIONS = {"large": 1, "xxl": 8}


def _seconds(plan: Optional[decode_plan.DecodePlan]) -> float:
  return plan.seconds_per_sample if plan else float("nan")


def _cell(seconds: float, digits: int = 4) -> str:
  return "-" if math.isnan(seconds) else f"{seconds:.{digits}f}"


def _fixed(found: decode_plan.LayoutSearch, size: str) -> Optional[decode_plan.DecodePlan]:
  return dict(found.candidates).get(decode_plan.DecodeLayout(FIXED_PARTITIONS[size]))


def simulate(topology: Topology, inputs_len: int, targets_len: int, max_batch_per_chip: int,
             figure6_groups: Sequence[int] = FIGURE6_GROUPS) -> Tuple[str, Dict[str, dict]]:
  """(Table 1's T_infer and Figure 6 simulated on `topology`, each model in its fastest
  layout, beside the fixed layout's times and the paper's numbers; every search as JSON)."""
  @functools.lru_cache(maxsize=None)
  def search(size, kv):
    return decode_plan.search_layouts(t5_1_1_config(size, num_kv_heads=kv), topology,
                                      inputs_len, targets_len, max_batch_per_chip)

  searches = {name: search(size, kv) for name, size, kv, _ in PAPER_T_INFER}
  best = {name: _seconds(found.best) for name, found in searches.items()}
  fixed = {name: _seconds(_fixed(searches[name], size)) for name, size, _, _ in PAPER_T_INFER}
  paper = {name: seconds for name, _, _, seconds in PAPER_T_INFER}
  rows = []
  for name, _, _, _ in PAPER_T_INFER:
    plan = searches[name].best
    rows.append((name, plan.layout.describe(topology) if plan else "none fits",
                 plan.batch_per_chip if plan else "-", _cell(best[name]), _cell(fixed[name]),
                 f"{paper[name]:.2f}", _cell(paper[name] / best[name], 2)))
  ratios = [(f"MHA-XXL / {other}", _cell(best["MHA-XXL"] / best[other], 2),
             _cell(fixed["MHA-XXL"] / fixed[other], 2), f"{paper['MHA-XXL'] / paper[other]:.2f}")
            for other in ("MQA-XXL", "GQA-8-XXL")]
  figure6 = []
  for groups in figure6_groups:
    found = search("xxl", None if groups == 64 else groups)
    searches[f"XXL G={groups}"] = found
    plan = found.best
    figure6.append((groups, plan.layout.describe(topology) if plan else "none fits",
                    plan.batch_per_chip if plan else "-", _cell(_seconds(plan)),
                    _cell(_seconds(_fixed(found, "xxl"))),
                    _cell(_seconds(plan) / best["MQA-XXL"], 2)))
  text = "\n".join([
      f"## Simulated Table 1 T_infer on {topology.name} ({topology.num_chips} chips), inputs "
      f"{inputs_len} / outputs {targets_len}, largest batch up to {max_batch_per_chip}/chip, "
      f"each model in its fastest layout (fixed layout: model parallel Large "
      f"{FIXED_PARTITIONS['large']}, XXL {FIXED_PARTITIONS['xxl']}, K/V replicated)",
      report.table(("model", "fastest layout", "batch/chip", "simulated s/sample",
                    "fixed layout s/sample", "paper s/sample", "paper / simulated"), rows), "",
      report.table(("ratio", "simulated, fastest layouts", "simulated, fixed layout", "paper"),
                   ratios), "",
      "## Simulated Figure 6: GQA-XXL time per sample vs number of groups (64 = MHA)",
      report.table(("groups", "fastest layout", "batch/chip", "simulated s/sample",
                    "fixed layout s/sample", "/ MQA-XXL"), figure6)])
  return text, {name: found.to_json(topology) for name, found in searches.items()}
