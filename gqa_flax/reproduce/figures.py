"""Figures 3-6 of the paper from a measured table1.json (matplotlib, Agg backend)."""
import os
from typing import List, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position

from gqa_flax.checkpoints.convert import METHODS  # noqa: E402  pylint: disable=wrong-import-position


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _subtitle(table: dict) -> str:
  return f"measured, preset {table['preset']}"


def _range(mean: float, values: Sequence[float]) -> Tuple[float, float]:
  """(below, above): how far the values' min and max lie from `mean`."""
  values = values or [mean]
  return mean - min(values), max(values) - mean


def _ci(entry: dict) -> Tuple[float, float]:
  """(below, above): how far a {'loss', 'ci95'} entry's interval reaches."""
  return entry["loss"] - entry["ci95"][0], entry["ci95"][1] - entry["loss"]


def _yerr(*extents: Tuple[float, float]) -> List[List[float]]:
  """Matplotlib's asymmetric errors [[below...], [above...]] of (below, above) pairs."""
  return [[below for below, _ in extents], [above for _, above in extents]]


def _no_heldout(ax) -> None:
  ax.text(0.5, 0.5, "held-out loss not measured\n(Preset.heldout_examples = 0)",
          ha="center", va="center", transform=ax.transAxes, fontsize=8)


def fig3(table: dict, path: str) -> None:
  """Average quality vs time per sample for Table 1's rows (bars: range over seeds)."""
  fig, ax = plt.subplots(figsize=(5, 4))
  for r in (r for r in table["rows"] if r["in_table1"]):
    x, y = r["t_infer_s"] * 1e3, r["average"]
    ax.errorbar([x], [y], yerr=_yerr(_range(y, r["average_by_seed"])),
                xerr=_yerr(_range(x, [t * 1e3 for t in r["t_infer_by_seed_s"]])), fmt="o",
                capsize=3)
    ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=(4, 4))
  ax.set(xlabel="time per sample (ms)", ylabel="average score",
         title=f"Figure 3: quality vs time ({_subtitle(table)})")
  _save(fig, path)


def _method_group(items: List[dict]) -> List[dict]:
  """The largest group of converted items that differ only in conversion method (mean,
  first, random order): Figure 4's bars."""
  groups = {}
  for item in items:
    if item["method"] is not None:
      groups.setdefault((item["model"], item["kv_heads"], item["alpha"]), []).append(item)
  best = max(groups.values(), key=len, default=[])
  return sorted(best, key=lambda item: METHODS.index(item["method"]))


def fig4(table: dict, path: str) -> None:
  """Per conversion method: average score (bars: range over seeds) and held-out loss (bars:
  95% interval)."""
  fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 4))
  rows = _method_group(table["rows"])
  for r in rows:
    score_ax.bar(r["method"], r["average"],
                 yerr=_yerr(_range(r["average"], r["average_by_seed"])), capsize=4)
  score_ax.set(xlabel="conversion", ylabel="average score",
               title=f"{rows[0]['label']}, alpha {rows[0]['alpha']:g}" if rows else "no rows")
  entries = _method_group([e for e in table["heldout"] if e["alpha"] > 0]) or _method_group(
      table["heldout"])  # after uptraining, as Figure 4; else right after conversion
  for e in entries:
    loss_ax.bar(e["method"], e["loss"], yerr=_yerr(_ci(e)), capsize=4)
  if entries:
    low = min(e["ci95"][0] for e in entries)
    loss_ax.set_ylim(low - 0.05 * abs(low), max(e["ci95"][1] for e in entries) * 1.02)
    loss_ax.set_title(f"{entries[0]['label']}, alpha {entries[0]['alpha']:g}")
  else:
    _no_heldout(loss_ax)
  loss_ax.set(xlabel="conversion", ylabel="held-out loss (lower is better)")
  fig.suptitle(f"Figure 4: conversion methods ({_subtitle(table)})")
  _save(fig, path)


def fig5(table: dict, path: str) -> None:
  """Quality vs uptraining proportion alpha, one line per attention (mean pooling), as the
  paper draws it: average score (bars: range over seeds) and held-out loss (bars: 95%
  interval, alpha 0 = right after conversion); dashed: the multi-head model."""
  fig, (score_ax, loss_ax) = plt.subplots(1, 2, figsize=(9, 4))
  for ax, items, value, error in (
      (score_ax, table["rows"], "average", lambda r: _range(r["average"], r["average_by_seed"])),
      (loss_ax, table["heldout"], "loss", _ci)):
    lines = {}
    for item in items:
      if item["method"] == "mean":
        lines.setdefault(item["label"], []).append(item)
      elif item["method"] is None:
        ax.axhline(item[value], linestyle="--", color="gray", label=f"{item['label']}")
    for label, points in sorted(lines.items()):
      points.sort(key=lambda item: item["alpha"])
      ax.errorbar([item["alpha"] for item in points], [item[value] for item in points],
                  yerr=_yerr(*map(error, points)), marker="o", capsize=3, label=label)
    if lines or any(item["method"] is None for item in items):
      ax.legend(fontsize=8)
  score_ax.set(xlabel="uptraining proportion alpha", ylabel="average score")
  loss_ax.set(xlabel="uptraining proportion alpha", ylabel="held-out loss (lower is better)")
  if not table["heldout"]:
    _no_heldout(loss_ax)
  fig.suptitle(f"Figure 5: uptraining ({_subtitle(table)})")
  _save(fig, path)


def _timing_panel(ax, timing: dict, title: str) -> None:
  points = timing["points"]
  errors = [_range(p["t_infer_s"] * 1e3, [t * 1e3 for t in p.get("t_infer_repeats_s", [])])
            for p in points]
  ax.errorbar([p["kv_heads"] for p in points], [p["t_infer_s"] * 1e3 for p in points],
              yerr=_yerr(*errors), marker="o", capsize=3)
  ax.set_xscale("log", base=2)
  ax.set_xticks([p["kv_heads"] for p in points], [str(p["kv_heads"]) for p in points])
  ax.set(xlabel="GQA groups (key/value heads)", ylabel="time per sample (ms)",
         title=f"{title}: input {timing['inputs']}, output {timing['targets']}")


def fig6(table: dict, path: str) -> None:
  """Time per sample vs number of key/value groups (bars: range of the timed repeats): the
  reproduction's model, and the key/value-bound shape when timed."""
  timings = [(table["fig6"], "model")]
  if table.get("fig6_kv_bound"):
    timings.append((table["fig6_kv_bound"], "key/value-bound shape"))
  fig, axes = plt.subplots(1, len(timings), figsize=(5 * len(timings), 4), squeeze=False)
  for ax, (timing, title) in zip(axes[0], timings):
    _timing_panel(ax, timing, title)
  fig.suptitle(f"Figure 6: time per sample vs groups ({_subtitle(table)})")
  _save(fig, path)


def pretraining(table: dict, path: str) -> None:
  """Each pre-trained model's training loss and held-out (train_eval) loss against steps."""
  fig, ax = plt.subplots(figsize=(5, 4))
  for model, curve in sorted(table["pretraining"].items()):
    line, = ax.plot(curve["step"], curve["train_loss"], alpha=0.5, label=f"{model}: training")
    ax.plot(curve["heldout_step"], curve["heldout_loss"], marker="o", color=line.get_color(),
            label=f"{model}: held-out")
  ax.set(xlabel="pre-training step", ylabel="loss per target token",
         title=f"Pre-training of the multi-head model ({_subtitle(table)})")
  ax.legend(fontsize=8)
  _save(fig, path)


def draw_all(table: dict, out: str) -> List[str]:
  """fig3.png .. fig6.png, and pretraining.png when the run pre-trained a model."""
  drawings = [(f"fig{number}.png", draw) for number, draw in ((3, fig3), (4, fig4), (5, fig5),
                                                                (6, fig6))]
  if table.get("pretraining"):
    drawings.append(("pretraining.png", pretraining))
  paths = []
  for name, draw in drawings:
    path = os.path.join(out, name)
    draw(table, path)
    paths.append(path)
  return paths
