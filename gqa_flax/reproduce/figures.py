"""Figures 3-6 of the paper from a measured table1.json (matplotlib, Agg backend)."""
import os
from typing import List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position


def _save(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _subtitle(table: dict) -> str:
  return f"measured, preset {table['preset']}"


def fig3(table: dict, path: str) -> None:
  """Average quality vs time per sample for Table 1's rows."""
  fig, ax = plt.subplots(figsize=(5, 4))
  for r in (r for r in table["rows"] if r["in_table1"]):
    ax.scatter(r["t_infer_s"] * 1e3, r["average"])
    ax.annotate(r["label"], (r["t_infer_s"] * 1e3, r["average"]), textcoords="offset points",
                xytext=(4, 4))
  ax.set(xlabel="time per sample (ms)", ylabel="average score",
         title=f"Figure 3: quality vs time ({_subtitle(table)})")
  _save(fig, path)


def _method_rows(table: dict) -> List[dict]:
  """Rows that differ only in conversion method from another row (Figure 4's group)."""
  groups = {}
  for r in table["rows"]:
    if r["method"] is not None:
      groups.setdefault((r["model"], r["kv_heads"], r["alpha"]), []).append(r)
  best = max(groups.values(), key=len, default=[])
  order = {"mean": 0, "first": 1, "random": 2}
  return sorted(best, key=lambda r: order[r["method"]])


def fig4(table: dict, path: str) -> None:
  """Average quality per conversion method."""
  rows = _method_rows(table)
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.bar([r["method"] for r in rows], [r["average"] for r in rows])
  if rows:
    ax.set_ylim(min(r["average"] for r in rows) * 0.9, max(r["average"] for r in rows) * 1.05)
    label = f"{rows[0]['label']}, alpha {rows[0]['alpha']:g}"
  else:
    label = "no converted rows"
  ax.set(xlabel="conversion", ylabel="average score",
         title=f"Figure 4: conversion methods ({label})")
  ax.text(0.01, 0.01, _subtitle(table), transform=ax.transAxes, fontsize=8)
  _save(fig, path)


def fig5(table: dict, path: str) -> None:
  """Average quality vs uptraining proportion alpha, one line per attention (mean pooling)."""
  fig, ax = plt.subplots(figsize=(5, 4))
  lines = {}
  for r in table["rows"]:
    if r["method"] == "mean":
      lines.setdefault(r["label"], []).append((r["alpha"], r["average"]))
  for label, points in sorted(lines.items()):
    points.sort()
    ax.plot([a for a, _ in points], [s for _, s in points], marker="o", label=label)
  for r in table["rows"]:
    if r["method"] is None:
      ax.axhline(r["average"], linestyle="--", color="gray", label=f"{r['label']} (no conversion)")
  ax.set(xlabel="uptraining proportion alpha", ylabel="average score",
         title=f"Figure 5: uptraining ({_subtitle(table)})")
  ax.legend(fontsize=8)
  _save(fig, path)


def fig6(table: dict, path: str) -> None:
  """Time per sample vs number of key/value groups."""
  timing = table["fig6"]
  points = timing["points"]
  fig, ax = plt.subplots(figsize=(5, 4))
  ax.plot([p["kv_heads"] for p in points], [p["t_infer_s"] * 1e3 for p in points], marker="o")
  ax.set_xscale("log", base=2)
  ax.set_xticks([p["kv_heads"] for p in points], [str(p["kv_heads"]) for p in points])
  ax.set(xlabel="GQA groups (key/value heads)", ylabel="time per sample (ms)",
         title=f"Figure 6: input {timing['inputs']}, output {timing['targets']} "
         f"({_subtitle(table)})")
  _save(fig, path)


def draw_all(table: dict, out: str) -> List[str]:
  paths = []
  for number, draw in ((3, fig3), (4, fig4), (5, fig5), (6, fig6)):
    path = os.path.join(out, f"fig{number}.png")
    draw(table, path)
    paths.append(path)
  return paths
