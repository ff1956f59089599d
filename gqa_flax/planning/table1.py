"""Simulated decoding times: the paper's Table 1 T_infer column and Figure 6 for T5.1.1-XXL.

The paper (section 3.1, "Timing") reports time per sample per TPUv4 chip from xprof, on 8
chips, with the largest batch that fits up to 32 per chip, input 2048 and output 512, and
parallelism tuned per model. Here a model of the hardware replaces the profiler: gqa-eval's
greedy decoding of each model is compiled for the slice in every layout (mesh data x model;
K/V heads the model axis does not divide replicated or batch-partitioned), its prefill and
decode step timed on the chip's roofline from XLA's per-device flops and bytes accessed, and
the fastest layout that fits is kept (decode_plan.search_layouts).
"""
import importlib.metadata
import json
import logging
import math
from typing import Dict, Optional, Sequence

from etils import epath
import jax

from gqa_flax import errors
from gqa_flax.models import t5_1_1_config
from gqa_flax.planning import decode_plan, report
from gqa_flax.planning.topology import Topology
from gqa_flax.storage import write_json

# Table 1 (s per sample per TPUv4 chip): (size, kv heads or None for MHA, paper value).
PAPER_T_INFER = (("large", None, 0.37), ("xxl", None, 1.51), ("xxl", 1, 0.24), ("xxl", 8, 0.28))
FIGURE6_GROUPS = (1, 2, 4, 8, 16, 32, 64)  # the paper preset's Figure 6 groups
# The one layout of the first simulation, kept as a column: Large data-parallel, XXL 8-way
# model parallel over heads, K/V heads that the model axis does not divide replicated.
FIXED_PARTITIONS = {"large": 1, "xxl": 8}


def model_name(size: str, kv_heads: Optional[int]) -> str:
  """E.g. MHA-Large, MQA-XXL, GQA-8-XXL (kv_heads None: multi-head)."""
  attention = t5_1_1_config(size, num_kv_heads=kv_heads).attention_name
  return f"{attention}-{'XXL' if size == 'xxl' else size.title()}"


class SavedSearches:
  """Each model's layout search on `topology`, saved to `path` (JSON; None: not saved) as soon
  as it finishes, so that an interrupted `gqa-plan --table1`, or a rerun with more Figure 6
  groups, compiles only the models not searched yet. Searches saved with other settings
  (slice, lengths, batch limit, jax or libtpu version) are searched again."""

  def __init__(self, path: Optional[str], topology: Topology, inputs_len: int, targets_len: int,
               max_batch_per_chip: int):
    self.path, self.topology = path, topology
    self.inputs_len, self.targets_len = inputs_len, targets_len
    self.max_batch_per_chip = max_batch_per_chip
    self.settings = {"topology": topology.name, "inputs_len": inputs_len,
                     "targets_len": targets_len, "max_batch_per_chip": max_batch_per_chip,
                     "jax": jax.__version__, "libtpu": importlib.metadata.version("libtpu")}
    self.saved: Dict[str, dict] = {}
    self.found: Dict[str, decode_plan.LayoutSearch] = {}
    if path and epath.Path(path).exists():
      try:
        data = json.loads(epath.Path(path).read_text())
      except ValueError as e:
        raise errors.UserError(f"{path} is not gqa-plan's JSON ({e}); remove it or choose "
                               "another --json_out") from None
      if isinstance(data, dict) and data.get("settings") == self.settings:
        self.saved = data["searches"]
      else:
        logging.info("%s holds searches made with other settings; searching again", path)

  def search(self, size: str, kv_heads: Optional[int]) -> decode_plan.LayoutSearch:
    """T5.1.1-`size` with `kv_heads` K/V heads (None: multi-head), searched or read back."""
    name = model_name(size, kv_heads)
    if name not in self.found:
      config = t5_1_1_config(size, num_kv_heads=kv_heads)
      if name in self.saved:
        logging.info("%s: reusing the search saved in %s", name, self.path)
        self.found[name] = decode_plan.LayoutSearch.from_json(
            config, self.topology, self.targets_len, self.saved[name])
      else:
        self.found[name] = decode_plan.search_layouts(
            config, self.topology, self.inputs_len, self.targets_len, self.max_batch_per_chip)
        self.saved[name] = self.found[name].to_json(self.topology)
        if self.path:
          write_json(self.path, {"settings": self.settings, "searches": self.saved})
    return self.found[name]


def _seconds(plan: Optional[decode_plan.DecodePlan]) -> float:
  return plan.seconds_per_sample if plan else float("nan")


def _cell(seconds: float, digits: int = 4) -> str:
  return "-" if math.isnan(seconds) else f"{seconds:.{digits}f}"


def _fixed(found: decode_plan.LayoutSearch, size: str) -> Optional[decode_plan.DecodePlan]:
  return dict(found.candidates).get(decode_plan.DecodeLayout(FIXED_PARTITIONS[size]))


def simulate(searches: SavedSearches, figure6_groups: Sequence[int] = FIGURE6_GROUPS) -> str:
  """Table 1's T_infer and Figure 6 simulated on the searches' slice, each model in its
  fastest layout, beside the fixed layout's times and the paper's numbers."""
  topology = searches.topology
  names = [model_name(size, kv) for size, kv, _ in PAPER_T_INFER]
  found = {name: searches.search(size, kv) for name, (size, kv, _) in zip(names, PAPER_T_INFER)}
  best = {name: _seconds(search.best) for name, search in found.items()}
  fixed = {name: _seconds(_fixed(found[name], size))
           for name, (size, _, _) in zip(names, PAPER_T_INFER)}
  paper = {name: seconds for name, (_, _, seconds) in zip(names, PAPER_T_INFER)}
  rows = []
  for name in names:
    plan = found[name].best
    rows.append((name, plan.layout.describe(topology) if plan else "none fits",
                 plan.batch_per_chip if plan else "-", _cell(best[name]), _cell(fixed[name]),
                 f"{paper[name]:.2f}", _cell(paper[name] / best[name], 2)))
  ratios = [(f"MHA-XXL / {other}", _cell(best["MHA-XXL"] / best[other], 2),
             _cell(fixed["MHA-XXL"] / fixed[other], 2), f"{paper['MHA-XXL'] / paper[other]:.2f}")
            for other in ("MQA-XXL", "GQA-8-XXL")]
  figure6 = []
  for groups in figure6_groups:
    search = searches.search("xxl", None if groups == 64 else groups)
    plan = search.best
    figure6.append((groups, plan.layout.describe(topology) if plan else "none fits",
                    plan.batch_per_chip if plan else "-", _cell(_seconds(plan)),
                    _cell(_seconds(_fixed(search, "xxl"))),
                    _cell(_seconds(plan) / best["MQA-XXL"], 2)))
  return "\n".join([
      f"## Simulated Table 1 T_infer on {topology.name} ({topology.num_chips} chips), inputs "
      f"{searches.inputs_len} / outputs {searches.targets_len}, largest batch up to "
      f"{searches.max_batch_per_chip}/chip, each model in its fastest layout (fixed layout: "
      f"model parallel Large {FIXED_PARTITIONS['large']}, XXL {FIXED_PARTITIONS['xxl']}, "
      "K/V replicated)",
      report.table(("model", "fastest layout", "batch/chip", "simulated s/sample",
                    "fixed layout s/sample", "paper s/sample", "paper / simulated"), rows), "",
      report.table(("ratio", "simulated, fastest layouts", "simulated, fixed layout", "paper"),
                   ratios), "",
      "## Simulated Figure 6: GQA-XXL time per sample vs number of groups (64 = MHA)",
      report.table(("groups", "fastest layout", "batch/chip", "simulated s/sample",
                    "fixed layout s/sample", "/ MQA-XXL"), figure6)])
