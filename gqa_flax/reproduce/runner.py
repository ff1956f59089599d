"""Runs a plan's stages in order as subprocesses; resumable.

A stage is done when OUT/stages/NAME/DONE.json exists: it is written atomically after the
command exits 0 and holds the command, its seconds and its result file's contents. Done
stages are skipped; a failed or interrupted stage has no DONE.json and runs again (training
resumes from its run's latest checkpoint). Each stage's output goes to OUT/stages/NAME/log.txt;
its last line is echoed every `heartbeat` seconds.
"""
import json
import os
import subprocess
import time
from typing import Dict, List, Optional

from gqa_flax.reproduce.stages import Plan, Stage
from gqa_flax.reproduce.timing import write_json

DONE = "DONE.json"
LOG = "log.txt"


class StageError(RuntimeError):
  """A stage's command exited non-zero."""


def done_record(plan: Plan, name: str) -> Optional[dict]:
  path = os.path.join(plan.stage_dir(name), DONE)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def _fmt(seconds: float) -> str:
  return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def stage_view(plan: Plan, stages: List[Stage], running: Optional[str] = None) -> str:
  """One line per stage: [x] done (its seconds), [>] running, [ ] left."""
  lines = []
  for stage in stages:
    record = done_record(plan, stage.name)
    if record is not None:
      lines.append(f"  [x] {stage.name} ({_fmt(record['seconds'])})")
    else:
      lines.append(f"  [{'>' if stage.name == running else ' '}] {stage.name}")
  return "\n".join(lines)


def _last_line(path: str) -> str:
  """The log's last progress line (one with an ETA), else its last line."""
  with open(path, "rb") as f:
    f.seek(max(0, os.path.getsize(path) - 16384))
    tail = f.read().decode("utf-8", "replace").replace("\r", "\n").strip().splitlines()
  progress = [line for line in tail if "ETA" in line]
  return (progress or tail or [""])[-1].strip()


def run_stage(plan: Plan, stage: Stage, heartbeat: float) -> dict:
  """Runs `stage`'s command; writes and returns its DONE record; raises StageError."""
  directory = plan.stage_dir(stage.name)
  os.makedirs(directory, exist_ok=True)
  log = os.path.join(directory, LOG)
  start = time.time()
  with open(log, "w") as out:
    out.write(" ".join(stage.argv) + "\n")
    out.flush()
    process = subprocess.Popen(list(stage.argv), stdout=out, stderr=subprocess.STDOUT,
                               env=plan.env())
    while True:
      try:
        code = process.wait(timeout=heartbeat)
        break
      except subprocess.TimeoutExpired:
        print(f"    {stage.name} {_fmt(time.time() - start)}: {_last_line(log)[:150]}", flush=True)
      except BaseException:
        process.kill()
        raise
  if code != 0:
    raise StageError(f"stage {stage.name} failed (exit {code}) after "
                     f"{_fmt(time.time() - start)}: {_last_line(log)[:300]} -- full log: {log}")
  result = None
  if stage.result:
    with open(stage.result) as f:
      result = json.load(f)
  record = {"stage": stage.name, "argv": list(stage.argv), "seconds": round(time.time() - start, 1),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "result": result}
  write_json(os.path.join(directory, DONE), record)
  return record


def run_all(plan: Plan, heartbeat: float = 30.0) -> Dict[str, dict]:
  """Runs every stage not done yet; returns stage name -> DONE record."""
  stages = plan.stages()
  todo = [s for s in stages if done_record(plan, s.name) is None]
  print(f"{len(stages)} stages, {len(stages) - len(todo)} done, {len(todo)} to run "
        f"(logs under {os.path.join(plan.out, 'stages')})", flush=True)
  start = time.time()
  print(stage_view(plan, stages), flush=True)
  for i, stage in enumerate(todo, 1):
    print(f"[{i}/{len(todo)}] running {stage.name} ({len(stages) - len(todo) + i - 1} done, "
          f"{len(todo) - i} left after it)", flush=True)
    record = run_stage(plan, stage, heartbeat)
    elapsed = time.time() - start
    eta = elapsed / i * (len(todo) - i)
    print(f"stage {i}/{len(todo)} {stage.name} done in {_fmt(record['seconds'])}; elapsed "
          f"{_fmt(elapsed)}, {len(todo) - i} left, ETA ~{_fmt(eta)} (mean stage time)", flush=True)
  print(stage_view(plan, stages), flush=True)
  return {s.name: done_record(plan, s.name) for s in stages}
