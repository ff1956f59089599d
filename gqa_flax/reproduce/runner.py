"""Runs a plan's stages in order as processes; resumable, on one host or on every host of a pod.

A stage is done when OUT/stages/NAME/DONE.json exists: it is written atomically after the
command exits 0 and holds the command, its seconds and its result file's contents. Done
stages are skipped; a failed or interrupted stage has no DONE.json and runs again (training
resumes from its run's latest checkpoint). Each stage's output goes to OUT/stages/NAME/log.txt;
its last line is echoed every `heartbeat` seconds. Stage commands (`python -m MODULE ...`) are
forked from a server that imported the libraries once (`forkserver.py`).

On a pod (the runner joined with `pod.initialize`) every host runs this with the same plan:
process 0 decides which stages are left and broadcasts the list; every host runs each stage
(joined into a pod of its own by the flags appended here, on the next coordinator port); the
hosts' exit codes are shared, so all agree whether the stage failed; process 0 alone writes
log.txt, DONE.json and the messages (the others log to a local temporary file); a barrier
ends each stage. When a host is gone (killed, lost), the others end their stage's command
and exit with one line within a minute (`pod.watch_for_failures`); rerunning the command on
every host resumes.
"""
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

from etils import epath

from gqa_flax import pod, processes
from gqa_flax.reproduce.forkserver import ForkedProcess, ForkServer
from gqa_flax.reproduce.stages import Plan, Stage
from gqa_flax.storage import write_json

DONE = "DONE.json"
LOG = "log.txt"
_LOCAL_PREFIX = "gqa_reproduce_"  # + runner pid: a stage's host-local log directory


class StageError(RuntimeError):
  """A stage's command exited non-zero."""


def done_record(plan: Plan, name: str) -> Optional[dict]:
  path = epath.Path(plan.stage_dir(name)) / DONE
  if not path.is_file():
    return None
  return json.loads(path.read_text())


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


def _stage_argv(stage: Stage, index: int, pod_flags: Optional[dict]) -> List[str]:
  """The stage's command, joined into a pod on coordinator port + 1 + `index` on a pod."""
  if not pod_flags or stage.writer_only:
    return list(stage.argv)
  host, port = pod_flags["coordinator_address"].rsplit(":", 1)
  return list(stage.argv) + pod.as_argv(True, f"{host}:{int(port) + 1 + index}",
                                        pod_flags["process_count"], pod_flags["process_index"])


_running: List[ForkedProcess] = []  # the stage command now running on this host


def _kill_running() -> None:
  """Ends the running stage command (a pod watcher calls it when another host is gone)."""
  for process in _running:
    process.kill()


def _run_command(server: ForkServer, argv: List[str], log: str, name: str,
                 heartbeat: float) -> int:
  """Runs `argv` (python -m MODULE ...) with its output in the local file `log`; echoes
  progress every heartbeat."""
  start = time.time()
  with open(log, "w") as out:
    out.write(" ".join(argv) + "\n")
  if argv[:2] != [sys.executable, "-m"]:
    raise ValueError(f"a stage command is `python -m MODULE ...`, not {argv[:3]}")
  process = server.start(argv[2:], log)
  _running.append(process)
  try:
    while True:
      try:
        return process.wait(timeout=heartbeat)
      except subprocess.TimeoutExpired:
        if pod.is_writer():
          print(f"    {name} {_fmt(time.time() - start)}: {_last_line(log)[:150]}", flush=True)
  except BaseException:
    process.kill()
    raise
  finally:
    _running.remove(process)


def remove_dead_runners_logs() -> None:
  """Removes the host-local log directories of runners that are gone without removing them
  (a host killed with SIGKILL); those of live runners stay."""
  for path in glob.glob(os.path.join(tempfile.gettempdir(), f"{_LOCAL_PREFIX}*_*")):
    match = re.fullmatch(rf"{_LOCAL_PREFIX}(\d+)_.+", os.path.basename(path))
    if match and not processes.alive(int(match.group(1))):
      shutil.rmtree(path, ignore_errors=True)


def run_stage(plan: Plan, server: ForkServer, stage: Stage, heartbeat: float, index: int = 0,
              pod_flags: Optional[dict] = None) -> dict:
  """Runs `stage`'s command (on every host of a pod); writes and returns its DONE record;
  raises StageError on every host when it failed on any."""
  with tempfile.TemporaryDirectory(prefix=f"{_LOCAL_PREFIX}{os.getpid()}_") as local_dir:
    return _run_stage(plan, server, stage, heartbeat, index, pod_flags,
                      os.path.join(local_dir, LOG))


def _run_stage(plan: Plan, server: ForkServer, stage: Stage, heartbeat: float, index: int,
               pod_flags: Optional[dict], local_log: str) -> dict:
  """`run_stage` with this host's log in the temporary file `local_log`."""
  directory = epath.Path(plan.stage_dir(stage.name))
  start = time.time()
  code = 0
  if pod.is_writer() or not stage.writer_only:
    code = _run_command(server, _stage_argv(stage, index, pod_flags), local_log, stage.name,
                        heartbeat)
  codes = pod.gather(f"stage/{stage.name}/code", code)
  log = directory / LOG
  if pod.is_writer():
    directory.mkdir(parents=True, exist_ok=True)
    log.write_text(epath.Path(local_log).read_text())
  if -signal.SIGINT in codes:  # Ctrl-C reached the stage before this process saw it
    raise KeyboardInterrupt(f"stage {stage.name} interrupted")
  if any(codes):
    failed = [i for i, c in enumerate(codes) if c]
    last = _last_line(local_log) if os.path.exists(local_log) else ""
    raise StageError(f"stage {stage.name} failed (exit {codes[failed[0]]} on process "
                     f"{failed[0]} of {len(codes)}) after {_fmt(time.time() - start)}: "
                     f"{last[:300]} -- full log: {log}")
  record = None
  if pod.is_writer():
    result = json.loads(epath.Path(stage.result).read_text()) if stage.result else None
    record = {"stage": stage.name, "argv": list(stage.argv),
              "seconds": round(time.time() - start, 1),
              "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
              "load_average": [round(x, 2) for x in os.getloadavg()], "result": result}
    write_json(str(directory / DONE), record)
  pod.barrier(f"stage/{stage.name}/done")
  return record or done_record(plan, stage.name)


def stage_kind(name: str) -> str:
  """A stage name's first word: prepare, pretrain, convert, uptrain, finetune, fig6, ..."""
  return name.split("-")[0]


def estimate_left(seconds_by_kind: Dict[str, List[float]], left: List[str]) -> Tuple[float, int]:
  """(seconds, untimed): what the stages named `left` should take at the mean time of this
  invocation's finished stages of their kind, and how many are of a kind none finished yet
  (not counted: a pre-training and a conversion stage differ a hundredfold)."""
  seconds, untimed = 0.0, 0
  for name in left:
    times = seconds_by_kind.get(stage_kind(name))
    if times:
      seconds += sum(times) / len(times)
    else:
      untimed += 1
  return seconds, untimed


def run_all(plan: Plan, heartbeat: float = 30.0, pod_flags: Optional[dict] = None
            ) -> Dict[str, dict]:
  """Runs every stage not done yet; returns stage name -> DONE record. On a pod, call it on
  every host with the same plan and `pod_flags` (the runner's own, see module docstring)."""
  stages = plan.stages()
  remove_dead_runners_logs()
  pod.at_failure(_kill_running)
  left = pod.broadcast("stages/left", [s.name for s in stages
                                       if pod.is_writer() and done_record(plan, s.name) is None])
  todo = [s for s in stages if s.name in left]
  print(f"{len(stages)} stages, {len(stages) - len(todo)} done, {len(todo)} to run "
        f"(logs under {os.path.join(plan.out, 'stages')})", flush=True)
  start = time.time()
  print(stage_view(plan, stages), flush=True)
  server = ForkServer(plan.env()) if todo else None
  try:
    seconds_by_kind: Dict[str, List[float]] = {}
    for i, stage in enumerate(todo, 1):
      print(f"[{i}/{len(todo)}] running {stage.name} ({len(stages) - len(todo) + i - 1} done, "
            f"{len(todo) - i} left after it)", flush=True)
      record = run_stage(plan, server, stage, heartbeat, stages.index(stage), pod_flags)
      seconds_by_kind.setdefault(stage_kind(stage.name), []).append(record["seconds"])
      eta, untimed = estimate_left(seconds_by_kind, [s.name for s in todo[i:]])
      untimed_note = f"; {untimed} of kinds not timed yet" if untimed else ""
      print(f"stage {i}/{len(todo)} {stage.name} done in {_fmt(record['seconds'])}; elapsed "
            f"{_fmt(time.time() - start)}, {len(todo) - i} left, ETA ~{_fmt(eta)} (each at the "
            f"mean time of its kind so far{untimed_note})", flush=True)
  finally:
    if server:
      server.close()
  print(stage_view(plan, stages), flush=True)
  return {s.name: done_record(plan, s.name) for s in stages}
