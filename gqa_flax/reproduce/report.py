"""table1.json and table1.md from the stages' results.

Rows hold what this run measured; the paper's Table 1 sits apart under "paper" (JSON) and in
columns labelled "paper" (Markdown), next to the measured row it corresponds to. With several
seeds a row's task scores, average and time are means (time: median) over the seeds, shown
with their range over the seeds; its held-out loss has the claims' 95% bootstrap interval
(`statistics.py`: seeds, then examples, resampled).
"""
import json
import math
import os
import platform
from typing import Dict, List, Optional, Sequence

import numpy as np
from etils import epath

from gqa_flax.reproduce import baselines, claims, statistics
from gqa_flax.reproduce.evaluate import run_output_dir
from gqa_flax.reproduce.presets import Variant
from gqa_flax.reproduce.runner import stage_kind
from gqa_flax.reproduce.stages import Plan, seeded
from gqa_flax.storage import write_json
from gqa_flax.training.evaluation import predictions_file

# Ainslie et al. 2023, Table 1 (TPUv4; dev sets; T_infer in s per sample).
PAPER_TABLE1 = {
    "tasks": ["CNN (R1)", "arXiv (R1)", "PubMed (R1)", "MediaSum (R1)", "MultiNews (R1)",
              "WMT (BLEU)", "TriviaQA (F1)"],
    "rows": {
        "MHA-Large": {"t_infer_s": 0.37, "average": 46.0,
                      "scores": [42.9, 44.6, 46.2, 35.5, 46.6, 27.7, 78.2]},
        "MHA-XXL": {"t_infer_s": 1.51, "average": 47.2,
                    "scores": [43.8, 45.6, 47.5, 36.4, 46.9, 28.4, 81.9]},
        "MQA-XXL": {"t_infer_s": 0.24, "average": 46.6,
                    "scores": [43.0, 45.0, 46.9, 36.1, 46.5, 28.5, 81.3]},
        "GQA-8-XXL": {"t_infer_s": 0.28, "average": 47.1,
                      "scores": [43.5, 45.4, 47.7, 36.3, 47.2, 28.4, 81.6]},
    },
}


def paper_row(v: Variant) -> str:
  """The paper's Table 1 row a measured variant corresponds to."""
  if v.label in PAPER_TABLE1["rows"]:
    return v.label
  return {"MHA": "MHA-XXL", "MQA": "MQA-XXL"}.get(v.attention, "GQA-8-XXL")


def hardware() -> str:
  cpu = platform.processor() or platform.machine()
  if os.path.isfile("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    cpu = names[0] if names else cpu
  return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def _mean_interval(sample: np.ndarray) -> dict:
  """{'loss': the mean of `sample` [seeds, examples], 'ci95': its 95% bootstrap interval}."""
  interval = statistics.bootstrap(lambda loss: loss, [sample])
  return {"loss": interval.estimate, "ci95": [interval.low, interval.high]}


def heldout_entries(plan: Plan, measured: Dict[str, np.ndarray]) -> List[dict]:
  """Every held-out variant's loss (mean over seeds and examples) and its 95% interval."""
  entries = []
  for v in plan.heldout_variants():
    sample = measured.get(claims.heldout(v.model, v.kv_heads, v.alpha, v.method))
    if sample is None:
      continue
    entries.append({"key": v.key, "model": v.model, "label": v.label, "kv_heads": v.kv_heads,
                    "alpha": v.alpha, "method": None if v.kv_heads is None else v.method,
                    **_mean_interval(sample), "seeds": sample.shape[0],
                    "examples": sample.shape[1]})
  return entries


def baseline_margins(plan: Plan, v: Variant, metrics: Dict[str, str]) -> Dict[str, dict]:
  """{task: `baselines.margin`} of a fine-tuned variant over its seeds' scored test examples
  (the evaluate stage's predictions), for the tasks that have a baseline."""
  margins = {}
  for task, metric in metrics.items():
    files = [predictions_file(run_output_dir(plan.stage_dir("evaluate"), seeded(v, seed),
                                             plan.run_dir(plan.finetune_run(v, seed, task))),
                              task) for seed in plan.preset.seeds]
    if task in baselines.BASELINES and all(os.path.isfile(f) for f in files):
      margins[task] = baselines.margin(metric, task, [baselines.read_predictions(f)
                                                      for f in files])
  return margins


def row(plan: Plan, v: Variant, records: Dict[str, dict], heldout: Dict[str, dict],
        measured: Dict[str, np.ndarray]) -> dict:
  """A variant's measured row: its seeds' runs (`stages.seeded`) combined."""
  seeds = plan.preset.seeds
  results = [records["evaluate"]["result"]["variants"][seeded(v, seed)] for seed in seeds]
  tasks = results[0]["tasks"]
  scores_by_seed = {task: [r["tasks"][task]["score"] for r in results] for task in tasks}
  average_by_seed = [float(np.mean([r["tasks"][task]["score"] for task in tasks]))
                     for r in results]
  t_infer_by_seed = [r["t_infer_s"] for r in results]
  metrics = {task: tasks[task]["metric"] for task in tasks}
  loss = heldout.get(v.key)
  return {"model": v.model, "label": v.label, "attention": v.attention,
          "kv_heads": tasks[next(iter(tasks))]["kv_heads"], "alpha": v.alpha,
          "method": None if v.kv_heads is None else v.method,
          "uptrain_steps": 0 if v.kv_heads is None else plan.preset.uptrain_steps(v),
          "seeds": list(seeds),
          "t_infer_s": float(np.median(t_infer_by_seed)), "t_infer_by_seed_s": t_infer_by_seed,
          "scores": {task: float(np.mean(x)) for task, x in scores_by_seed.items()},
          "scores_by_seed": scores_by_seed,
          "average": float(np.mean(average_by_seed)), "average_by_seed": average_by_seed,
          "heldout_loss": loss and loss["loss"], "heldout_ci95": loss and loss["ci95"],
          "test_loss": {task: _mean_interval(measured[claims.test_loss(task, v.key)])
                        for task in tasks if claims.test_loss(task, v.key) in measured},
          "metrics": metrics, "baselines": baseline_margins(plan, v, metrics),
          "n_eval_examples": {task: tasks[task]["n_eval_examples"] for task in tasks},
          "in_table1": v in plan.preset.table_variants, "paper_row": paper_row(v),
          "device": results[0]["device"]}


TRAIN_LOSS = "cross_ent_loss_per_target_token"
HELDOUT_LOSS = f"train_eval/{TRAIN_LOSS}"


def pretraining_curve(model_dir: str) -> Optional[dict]:
  """{'step', 'train_loss', 'heldout_step', 'heldout_loss'} lists from a pre-training run's
  metrics.jsonl (its training loss and train_eval loss per logged step); None without one."""
  path = epath.Path(model_dir) / "metrics.jsonl"
  if not path.exists():
    return None
  curve = {"step": [], "train_loss": [], "heldout_step": [], "heldout_loss": []}
  for line in path.read_text().splitlines():
    entry = json.loads(line)
    if TRAIN_LOSS in entry:
      curve["step"].append(entry["step"])
      curve["train_loss"].append(entry[TRAIN_LOSS])
    if HELDOUT_LOSS in entry:
      curve["heldout_step"].append(entry["step"])
      curve["heldout_loss"].append(entry[HELDOUT_LOSS])
  return curve


def last_quarter_drop(curve: dict) -> Optional[float]:
  """How much the held-out loss fell over the last quarter of pre-training, relative to its
  value there (a flattened curve: near 0); None with fewer than two held-out points."""
  steps, losses = curve["heldout_step"], curve["heldout_loss"]
  if len(steps) < 2:
    return None
  start = next(i for i, step in enumerate(steps) if step >= 0.75 * steps[-1])
  start = min(start, len(steps) - 2)
  return (losses[start] - losses[-1]) / losses[start]


def pretrained_models(plan: Plan, records: Dict[str, dict]) -> Dict[str, dict]:
  """What the run pre-trained itself, per model: its curve (`pretraining_curve`) and, as the
  held-out stage measured it, how alike its decoder's key/value heads are
  ('kv_head_similarity': mean pairwise cosine per kernel, 'mean_kv_head_similarity': their
  mean; absent without a held-out stage)."""
  measured = ((records.get("heldout") or {}).get("result") or {}).get("kv_head_similarity", {})
  models = {}
  for model in plan.pretrains():
    curve = pretraining_curve(plan.run_dir(f"pretrain-{model}"))
    if curve is None:
      continue
    similarity = measured.get(model)
    models[model] = {**curve, "kv_head_similarity": similarity, "mean_kv_head_similarity": float(
        np.mean(list(similarity.values())))} if similarity else curve
  return models


def stage_times(records: Dict[str, dict]) -> Dict[str, dict]:
  """{stage: {'seconds', 'finished_at', 'load_average'}}: each stage's wall time, when it
  ended, and the host's 1/5/15-minute load average then (None if the record predates it)."""
  return {name: {"seconds": r["seconds"], "finished_at": r.get("finished_at"),
                 "load_average": r.get("load_average")} for name, r in records.items() if r}


def _stage_times_md(times: Dict[str, dict]) -> List[str]:
  """Wall time per kind of stage (count, total), and the load averages seen."""
  kinds: Dict[str, List[float]] = {}
  for name, t in times.items():
    kinds.setdefault(stage_kind(name), []).append(t["seconds"])
  loads = [t["load_average"][0] for t in times.values() if t["load_average"]]
  lines = ["", "Wall time of the stages (each stage's own in table1.json, `stage_times`):", "",
           "| stages | count | total (min) | longest (min) |", "|---|---|---|---|"] + [
               f"| {kind} | {len(s)} | {sum(s) / 60:.2f} | {max(s) / 60:.2f} |"
               for kind, s in kinds.items()]
  lines += ["", f"Load average (1 min) at the stages' ends: {min(loads):.2f}-{max(loads):.2f}, "
            f"median {np.median(loads):.2f}." if loads else
            "Load average: not recorded by this run's stages."]
  return lines


def build_table(plan: Plan, records: Dict[str, dict], seconds: Optional[float]) -> dict:
  p = plan.preset
  fig6 = records["fig6-timing"]["result"]
  measured = claims.measurements(records)
  heldout = heldout_entries(plan, measured)
  by_key = {entry["key"]: entry for entry in heldout}
  return {"preset": p.name, "hardware": hardware(), "stage_seconds": seconds,
          "stage_times": stage_times(records),
          "setup": {"pretrain_steps": p.pretrain_steps, "finetune_steps": p.finetune_steps,
                    "eval_examples_max": p.eval_examples, "eval_batch_size": p.eval_batch_size,
                    "timing_repeats": p.timing_repeats, "tasks": dict(p.tasks),
                    "models": dict(p.models), "bindings": list(p.bindings),
                    "seeds": f"{list(p.seeds)}: RANDOM_SEED (data order, dropout) and the random "
                             "conversion's seed of every run after pre-training (pre-training: "
                             "RANDOM_SEED=0)",
                    "heldout_examples": p.heldout_examples, "prepare": dict(p.prepare)},
          "rows": [row(plan, v, records, by_key, measured) for v in p.finetune_variants],
          "heldout": heldout, "fig6": fig6,
          "fig6_kv_bound": (records.get("fig6-timing-kv-bound") or {}).get("result"),
          "pretraining": pretrained_models(plan, records),
          "paper": PAPER_TABLE1}


def check_finite(table: dict) -> List[str]:
  """Names of row fields that are missing or not finite."""
  bad = []
  for r in table["rows"]:
    for name, value in [("t_infer_s", r["t_infer_s"]), ("average", r["average"])] + [
        (f"scores.{t}", s) for t, s in r["scores"].items()]:
      if not isinstance(value, (int, float)) or not math.isfinite(value):
        bad.append(f"{r['label']} a={r['alpha']} {r['method']}: {name}={value}")
  return bad


def _spread(mean: float, values: Sequence[float], scale: float = 1.0) -> str:
  """'12.34', or '12.34 (11.90-12.80)' (the range over seeds) with several seeds."""
  text = f"{mean * scale:.2f}"
  if len(values) > 1:
    text += f" ({min(values) * scale:.2f}-{max(values) * scale:.2f})"
  return text


def _interval_md(entry: Optional[dict]) -> str:
  """'5.123 [5.010, 5.240]' of a {'loss', 'ci95'} entry, '-' without one."""
  if entry is None:
    return "-"
  return f"{entry['loss']:.3f} [{entry['ci95'][0]:.3f}, {entry['ci95'][1]:.3f}]"


def _loss_md(r: dict) -> str:
  if r["heldout_loss"] is None:
    return "-"
  return _interval_md({"loss": r["heldout_loss"], "ci95": r["heldout_ci95"]})


def _row_md(r: dict, tasks: List[str]) -> str:
  paper = PAPER_TABLE1["rows"][r["paper_row"]]
  alpha = "-" if r["method"] is None else f"{r['alpha']:g}"
  cells = [r["label"], alpha, r["method"] or "-",
           _spread(r["t_infer_s"], r["t_infer_by_seed_s"], 1e3), _loss_md(r),
           _spread(r["average"], r["average_by_seed"])] + [
               _spread(r["scores"][t], r["scores_by_seed"][t]) for t in tasks] + [
               "/".join(str(r["n_eval_examples"][t]) for t in tasks),
               f"{paper['t_infer_s']} / {paper['average']} ({r['paper_row']})"]
  return "| " + " | ".join(cells) + " |"


def _timing_md(title: str, timing: dict) -> List[str]:
  return ["", f"{title} (inputs {timing['inputs']}, outputs {timing['targets']}, batch "
          f"{timing['batch_size']}, median of {timing['repeats']}, range of the repeats):", "",
          "| key/value heads | ms/sample |", "|---|---|"] + [
              f"| {p['kv_heads']} ({p['attention']}) | "
              f"{_spread(p['t_infer_s'], p.get('t_infer_repeats_s', []), 1e3)} |"
              for p in timing["points"]]


def to_markdown(table: dict) -> str:
  rows = table["rows"]
  tasks = list(rows[0]["scores"])
  header = ["Model", "alpha", "conversion", "T_infer (ms/sample)",
            "held-out loss [95% CI]", "Average"] + [
      f"{t} ({rows[0]['metrics'][t]})" for t in tasks] + [
          "n test", "paper: T_infer s / Average (paper row, TPUv4)"]
  sep = "|" + "|".join("---" for _ in header) + "|"
  head = "| " + " | ".join(header) + " |"
  lines = [f"# Table 1 ({table['preset']} preset): measured", "",
           f"Hardware: {table['hardware']} (JAX device: {rows[0]['device']}).", ""]
  if table.get("stage_seconds"):
    lines += [f"Time of all stages (summed over invocations): "
              f"{table['stage_seconds'] / 60:.1f} min.", ""]
  if len(rows[0]["seeds"]) > 1:
    lines += [f"Seeds {rows[0]['seeds']}: scores, averages and times are over the seeds, with "
              "their range over the seeds in parentheses.", ""]
  lines += [head, sep] + [_row_md(r, tasks) for r in rows if r["in_table1"]]
  ablations = [r for r in rows if not r["in_table1"]]
  if ablations:
    lines += ["", "Figure 4 / 5 variants (conversion method, uptraining proportion alpha):", "",
              head, sep] + [_row_md(r, tasks) for r in ablations]
  if table["heldout"]:
    lines += ["", "Held-out loss (the claims' measure: mean token cross entropy on the same "
              "held-out examples of the pre-training task; 95% bootstrap interval):", "",
              "| variant | alpha | conversion | loss [95% CI] | seeds x examples |",
              "|---|---|---|---|---|"] + [
                  f"| {e['label']} | {'-' if e['method'] is None else format(e['alpha'], 'g')} | "
                  f"{e['method'] or '-'} | {_interval_md(e)} | {e['seeds']} x {e['examples']} |"
                  for e in table["heldout"]]
  for model, curve in table.get("pretraining", {}).items():
    lines += ["", f"Pre-trained {model}."]
    if "mean_kv_head_similarity" in curve:
      lines[-1] += (f" Its decoder's key/value heads have a mean pairwise cosine similarity of "
                    f"{curve['mean_kv_head_similarity']:.3f} (0: unrelated heads, 1: identical).")
    drop = last_quarter_drop(curve)
    if drop is not None:
      lines[-1] += (f" Held-out loss (pretraining.png) {curve['heldout_loss'][0]:.3f} at step "
                    f"{curve['heldout_step'][0]}, {curve['heldout_loss'][-1]:.3f} at step "
                    f"{curve['heldout_step'][-1]}; it fell {100 * drop:.1f}% over the last "
                    "quarter of the steps.")
  tested = [r for r in rows if r["test_loss"]]
  if tested:
    lines += ["", "Fine-tuned test loss (mean token cross entropy on the scored test examples; "
              "95% bootstrap interval):", "", "| variant | alpha | conversion | " + " | ".join(
                  tasks) + " |", "|---|---|---|" + "---|" * len(tasks)] + [
                      f"| {r['label']} | {'-' if r['method'] is None else format(r['alpha'], 'g')}"
                      f" | {r['method'] or '-'} | " + " | ".join(
                          _interval_md(r["test_loss"].get(t)) for t in tasks) + " |"
                      for r in tested]
  margins = [(r, task, m) for r in rows for task, m in r.get("baselines", {}).items()]
  if margins:
    lines += ["", "Does fine-tuning learn the tasks? Each model's score beside a baseline that "
              "learns nothing, on the same test examples, and the margin (95% bootstrap "
              "interval over seeds and examples; ROUGE-1 per example, BLEU from summed "
              "n-gram statistics):", "",
              "| variant | task (metric) | baseline | baseline score | model score | "
              "margin [95% CI] |", "|---|---|---|---|---|---|"] + [
                  f"| {r['label']} | {task} ({m['metric']}) | {m['baseline']} | "
                  f"{m['baseline_score']:.2f} | {m['model_score']:.2f} | {m['margin']:+.2f} "
                  f"[{m['ci95'][0]:+.2f}, {m['ci95'][1]:+.2f}] |" for r, task, m in margins]
  lines += _timing_md("Figure 6 timing of the reproduction's model", table["fig6"])
  if table.get("fig6_kv_bound"):
    lines += _timing_md("Figure 6 timing of the key/value-bound shape "
                        f"({table['fig6_kv_bound']['source']}, random weights; the claims' "
                        "speed measures)", table["fig6_kv_bound"])
  if table.get("stage_times"):
    lines += _stage_times_md(table["stage_times"])
  setup = table["setup"]
  lines += ["", f"Setup: pre-training {setup['pretrain_steps']} steps; uptraining alpha x "
            f"pre-training steps; fine-tuning {setup['finetune_steps']} steps per task; greedy "
            f"decoding of at most {setup['eval_examples_max']} test examples per task (n test "
            f"above); T_infer: median of {setup['timing_repeats']} timed decodes of one batch of "
            f"{setup['eval_batch_size']}, per sample, averaged over tasks. Seeds: "
            f"{setup['seeds']}.", "",
            "The paper column is Ainslie et al. (2023), Table 1 (T5 Large/XXL on TPUv4, full "
            "datasets); it is for comparison only and was not measured here."]
  return "\n".join(lines) + "\n"


def write_report(plan: Plan, records: Dict[str, dict], seconds: Optional[float]) -> dict:
  table = build_table(plan, records, seconds)
  write_json(os.path.join(plan.out, "table1.json"), table)
  with open(os.path.join(plan.out, "table1.md"), "w") as f:
    f.write(to_markdown(table))
  return table
