"""Per-variant rows (times, bytes model, bandwidth, speedups), a text table and the plot."""
from typing import Dict, List, Optional

from gqa_flax.benchmarks.bytes_model import StepBytes


def variant_name(kv_heads: int, heads: int) -> str:
  return "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"


def rows(ours: Dict[int, dict], step_bytes: Dict[int, StepBytes], heads: int, batch: int,
         new_tokens: int, hf: Optional[dict] = None) -> List[dict]:
  """One row per K/V head count, largest first. `ours[G]` and `hf` are `runners` results
  (seconds per batch); speedups are against the multi-head row (G = heads)."""
  mha, mha_bytes = ours[heads], step_bytes[heads]
  out = []
  for kv_heads in sorted(ours, reverse=True):
    r, b = ours[kv_heads], step_bytes[kv_heads]
    predicted = mha_bytes.total / b.total
    measured = mha["step_s"] / r["step_s"]
    row = {
        "variant": variant_name(kv_heads, heads), "kv_heads": kv_heads,
        "our_time_s": r["total_s"] / batch, "tokens_per_s": batch * new_tokens / r["total_s"],
        "our_prefill_s": r["prefill_s"] / batch, "our_step_ms": 1e3 * r["step_s"],
        "bytes_per_step": b.as_dict(), "achieved_GBps": b.total / r["step_s"] / 1e9,
        "predicted_step_speedup": predicted, "measured_step_speedup": measured,
        "measured_over_predicted": measured / predicted,
        "time_per_sample_speedup": mha["total_s"] / r["total_s"],
    }
    if hf is not None:
      row.update(hf_variant="MHA", hf_time_s=hf["total_s"] / batch,
                 hf_prefill_s=hf["prefill_s"] / batch, hf_step_ms=1e3 * hf["step_s"],
                 speedup_vs_hf=hf["total_s"] / r["total_s"])
    out.append(row)
  return out


_COLUMNS = [  # (header, key, format)
    ("variant", "variant", "{}"), ("G", "kv_heads", "{}"), ("s/sample", "our_time_s", "{:.3f}"),
    ("tok/s", "tokens_per_s", "{:.0f}"), ("prefill s/sample", "our_prefill_s", "{:.3f}"),
    ("step ms", "our_step_ms", "{:.1f}"), ("MB/step", "bytes_mb", "{:.0f}"),
    ("GB/s", "achieved_GBps", "{:.1f}"), ("pred. step speedup", "predicted_step_speedup", "{:.2f}"),
    ("meas. step speedup", "measured_step_speedup", "{:.2f}"),
    ("meas./pred.", "measured_over_predicted", "{:.2f}"),
    ("HF-MHA s/sample", "hf_time_s", "{:.3f}"), ("HF/ours", "speedup_vs_hf", "{:.2f}"),
]


def table(rows_: List[dict]) -> str:
  """A fixed-width text table of `rows_` (HF columns only when present)."""
  cells = [{**r, "bytes_mb": r["bytes_per_step"]["total"] / 1e6} for r in rows_]
  columns = [c for c in _COLUMNS if all(c[1] in r for r in cells)]
  text = [[h for h, _, _ in columns]] + [[f.format(r[k]) for _, k, f in columns] for r in cells]
  widths = [max(len(line[i]) for line in text) for i in range(len(columns))]
  return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in text)


def plot(rows_: List[dict], title: str, path: str, read_GBps: float, batch: int,
         new_tokens: int) -> None:
  """Figure 6 style: time per sample against the number of K/V groups, measured, with the
  bytes model's prediction (measured prefill + new_tokens steps at the numpy read bandwidth)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  groups = [r["kv_heads"] for r in rows_]
  step_s = lambda r: r["bytes_per_step"]["total"] / (read_GBps * 1e9)
  predicted = [r["our_prefill_s"] + new_tokens * step_s(r) / batch for r in rows_]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot(groups, [r["our_time_s"] for r in rows_], "o-", label="measured (ours)")
  ax.plot(groups, predicted, "s--", label=f"bytes model at {read_GBps:.0f} GB/s")
  if "hf_time_s" in rows_[0]:
    ax.axhline(rows_[0]["hf_time_s"], color="gray", ls=":", label="HF transformers (MHA)")
  ax.set_xlabel("GQA groups (K/V heads)")
  ax.set_ylabel("time per sample (s)")
  ax.set_xticks(groups)
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
