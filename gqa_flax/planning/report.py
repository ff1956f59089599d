"""Plain-text tables of compiled programs for the `gqa-plan` report."""
from typing import Iterable, Sequence

from gqa_flax.planning.compiled import CompiledStep
from gqa_flax.planning.decode_plan import LayoutSearch
from gqa_flax.planning.topology import GiB, Generation, Topology


def gib(num_bytes: float) -> str:
  return f"{num_bytes / GiB:.3g}"


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
  """A Markdown table (it reads as plain text too)."""
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
  return "\n".join(lines)


MEMORY_HEADER = ("program", "batch/chip", "args GiB", "temps GiB", "outputs GiB", "total GiB",
                 "HBM GiB", "fits", "TFLOP", "GB accessed", "roofline s", "XLA optimal s", "compile s")


def memory_row(name: str, batch_per_chip, step: CompiledStep, generation: Generation) -> tuple:
  """One MEMORY_HEADER row: per-device bytes, flops, bytes accessed and times of one run."""
  hbm_bytes = generation.hbm_bytes
  if step.oom:
    return (name, batch_per_chip, "-", "-", "-", "> HBM", gib(hbm_bytes), "no (XLA: OOM)",
            "-", "-", "-", "-", f"{step.compile_seconds:.0f}")
  outputs = step.output_bytes - step.alias_bytes
  return (name, batch_per_chip, gib(step.argument_bytes), gib(step.temp_bytes), gib(outputs),
          gib(step.total_bytes), gib(hbm_bytes), "yes" if step.fits(hbm_bytes) else "no",
          f"{step.flops / 1e12:.3f}", f"{step.bytes_accessed / 1e9:.2f}",
          f"{generation.roofline_seconds(step.flops, step.bytes_accessed):.4g}",
          f"{step.xla_seconds:.4g}", f"{step.compile_seconds:.0f}")


def _model_name(config) -> str:
  return f"{config.attention_name} (kv heads {config.num_kv_heads})"


def decode_table(searches: Sequence[LayoutSearch], topology: Topology, inputs_len: int,
                 targets_len: int) -> str:
  """Each model's fastest layout (memory of its programs, time per sample), then every layout
  tried with its largest fitting batch."""
  generation = topology.generation
  rows, times, candidates = [], [], []
  for found in searches:
    name = _model_name(found.config)
    for layout, plan in found.candidates:
      candidates.append((name, layout.describe(topology),
                         plan.batch_per_chip if plan else "none fits",
                         f"{plan.seconds_per_sample:.4g}" if plan else "-"))
    plan = found.best
    if plan is None:
      times.append((name, "none fits", "-", "-", "-", "-"))
      continue
    per_chip = plan.batch_per_chip
    rows += [memory_row(f"{name} {part}", per_chip, program, generation)
             for part, program in (("prefill", plan.prefill), ("decode step", plan.step),
                                   ("whole decoding", plan.program))]
    times.append((name, plan.layout.describe(topology), per_chip,
                  f"{plan.seconds_per_sample:.4g}", f"{plan.xla_seconds_per_sample:.4g}",
                  f"`{plan.layout.gin_flags}`"))
  return "\n".join([
      f"## Greedy decoding on {topology.name} ({topology.num_chips} chips), inputs {inputs_len} / "
      f"outputs {targets_len}, bfloat16 params, each model in its fastest layout",
      table(MEMORY_HEADER, rows), "",
      f"time per sample per chip = (prefill + {targets_len} x step) / batch per chip",
      table(("model", "layout", "batch/chip", "roofline s/sample", "XLA optimal s/sample",
             "gqa-eval / gqa-infer flags"), times), "",
      "every layout tried (largest batch per chip that fits):",
      table(("model", "layout", "batch/chip", "roofline s/sample"), candidates)])
