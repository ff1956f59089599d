"""Simulated decoding times: the paper's Table 1 T_infer column and Figure 6 for T5.1.1-XXL.

The paper (section 3.1, "Timing") reports time per sample per TPUv4 chip from xprof, on 8
chips, with the largest batch that fits up to 32 per chip, input 2048 and output 512, and
parallelism tuned per model. Here a model of the hardware replaces the profiler: each model's
prefill and decode step are compiled for the slice and timed on the chip's roofline from
XLA's per-device flops and bytes accessed (decode_plan.py).
"""
from gqa_flax.models import t5_1_1_config
from gqa_flax.planning import decode_plan, report
from gqa_flax.planning.topology import Topology

# Table 1 (s per sample per TPUv4 chip): (name, size, kv heads or None for MHA, paper value).
PAPER_T_INFER = (("MHA-Large", "large", None, 0.37), ("MHA-XXL", "xxl", None, 1.51),
                 ("MQA-XXL", "xxl", 1, 0.24), ("GQA-8-XXL", "xxl", 8, 0.28))
FIGURE6_GROUPS = (1, 4, 8, 16, 32, 64)
# Model parallelism used for the simulation: Large runs data-parallel, XXL 8-way over heads.
PARTITIONS = {"large": 1, "xxl": 8}


def simulate(topology: Topology, inputs_len: int, targets_len: int, max_batch_per_chip: int) -> str:
  """Table 1's T_infer and Figure 6, simulated on `topology`, beside the paper's numbers."""
  def plan(size, kv):
    config = t5_1_1_config(size, num_kv_heads=kv)
    return decode_plan.best_decode_plan(config, topology, PARTITIONS[size], inputs_len,
                                        targets_len, max_batch_per_chip)

  plans = {(size, kv): plan(size, kv) for _, size, kv, _ in PAPER_T_INFER}
  simulated = {name: plans[(size, kv)].seconds_per_sample if plans[(size, kv)] else float("nan")
               for name, size, kv, _ in PAPER_T_INFER}
  paper = {name: seconds for name, _, _, seconds in PAPER_T_INFER}
  rows = [(name, plans[(size, kv)].batch_per_chip if plans[(size, kv)] else "none fits",
           f"{simulated[name]:.4f}", f"{paper[name]:.2f}", f"{paper[name] / simulated[name]:.1f}",
           f"{simulated[name] / simulated['MQA-XXL']:.2f}", f"{paper[name] / paper['MQA-XXL']:.2f}")
          for name, size, kv, _ in PAPER_T_INFER]
  figure6 = []
  for groups in FIGURE6_GROUPS:
    kv = None if groups == 64 else groups
    p = plans[("xxl", kv)] if ("xxl", kv) in plans else plan("xxl", kv)
    figure6.append((groups, p.batch_per_chip if p else "none fits",
                    f"{p.seconds_per_sample:.4f}" if p else "-",
                    f"{p.seconds_per_sample / simulated['MQA-XXL']:.2f}" if p else "-"))
  return "\n".join([
      f"## Simulated Table 1 T_infer on {topology.name} ({topology.num_chips} chips), inputs "
      f"{inputs_len} / outputs {targets_len}, largest batch up to {max_batch_per_chip}/chip "
      f"(model parallel: Large {PARTITIONS['large']}, XXL {PARTITIONS['xxl']})",
      report.table(("model", "batch/chip", "simulated s/sample", "paper s/sample",
                    "paper / simulated", "simulated / MQA-XXL", "paper / MQA-XXL"), rows), "",
      "## Simulated Figure 6: GQA-XXL time per sample vs number of groups (64 = MHA)",
      report.table(("groups", "batch/chip", "simulated s/sample", "/ MQA-XXL"), figure6)])
