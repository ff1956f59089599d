"""Joining a multi-host run (a pod) and the coordination that is not a collective computation.

Every host of a pod runs the same command. Before any other JAX call the command joins the
others (`initialize`):
  * TPU VMs of several hosts (TPU_WORKER_HOSTNAMES lists them): `jax.distributed.initialize()`
    finds the hosts itself;
  * GPU or CPU clusters: T5X's flags `--multiprocess_gpu --coordinator_address=HOST:PORT
    --process_count=N --process_index=I`. On the CPU backend the same flags form a CPU pod
    whose collectives run over gloo (how the tests simulate a pod on one machine).

Writes that are not collective computations have one writer, process 0 (`is_writer`); the
others wait for it at a `barrier`, and a decision taken by the writer reaches every host
with `broadcast` (both through the coordination service that jax.distributed starts, so
they need no accelerator and no compiled program). A process that fails reports it there
(`fail`), and every other process, watching (`watch_for_failures`), ends at once with the
same line. A process that ends without a word (killed, its host lost) is found by the same
watchers: each one beats in the coordination service, and a peer whose beat stops for
`_SILENT_S` seconds without having exited ends every other process with one line; so does
losing the service itself (process 0 gone).
"""
import argparse
import atexit
import collections
import json
import os
import sys
import threading
import time
from typing import Any, Callable, List, NoReturn, Optional

import jax

from gqa_flax import errors

_TIMEOUT_MS = 3_600_000  # a barrier waits up to an hour (a stage's conversion at XXL)
_FAILED_KEY = "gqa_flax/failed"  # {'process', 'message'} of the first process that failed
_WATCH_PERIOD_S = 0.5
_ACK_MS = 10_000  # how long a failing process waits for the others to have read its failure
_EXIT_GRACE_S = 1.0  # and then for them to exit, before it takes the service down with it
_ALIVE_KEY = "gqa_flax/alive"  # /<process>: a beat count, or 'exited' once it ended cleanly
_EXITED = "exited"
_SILENT_S = 30.0  # a peer whose beat stopped this long is gone
_at_failure: List[Callable[[], None]] = []  # run before a watcher ends the process
_uses = collections.Counter()  # every process passes the same barriers in the same order


def add_flags(parser: argparse.ArgumentParser) -> None:
  """T5X's multi-process flags, for the argparse command lines (absl ones: gin_utils)."""
  group = parser.add_argument_group("multi-host (T5X's flags)")
  group.add_argument("--multiprocess_gpu", action="store_true",
                     help="join a GPU/CPU cluster with the three flags below")
  group.add_argument("--coordinator_address", default=None,
                     help="HOST:PORT of process 0's coordinator")
  group.add_argument("--process_count", type=int, default=None, help="number of processes")
  group.add_argument("--process_index", type=int, default=None, help="this process's index")


def flags_of(args: Any) -> dict:
  """The multi-process flags of parsed arguments, as keyword arguments of `initialize`."""
  return {name: getattr(args, name) for name in
          ("multiprocess_gpu", "coordinator_address", "process_count", "process_index")}


def as_argv(multiprocess_gpu: bool = False, coordinator_address: Optional[str] = None,
            process_count: Optional[int] = None, process_index: Optional[int] = None) -> list:
  """The same settings as command-line flags (for a command that runs on every host)."""
  if not (multiprocess_gpu or coordinator_address):
    return []
  return ["--multiprocess_gpu", f"--coordinator_address={coordinator_address}",
          f"--process_count={process_count}", f"--process_index={process_index}"]


def _on_tpu_pod() -> bool:
  """A TPU VM of several hosts (its runtime lists them); never on the CPU backend."""
  hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
  return len(hosts) > 1 and not _cpu_backend()


def _cpu_backend() -> bool:
  return os.environ.get("JAX_PLATFORMS", "").split(",")[0] == "cpu"


def initialize(multiprocess_gpu: bool = False, coordinator_address: Optional[str] = None,
               process_count: Optional[int] = None, process_index: Optional[int] = None) -> None:
  """Joins the pod (see module docstring); a single host does nothing. Call before any JAX
  computation; a second call is a no-op."""
  if joined():
    return
  if multiprocess_gpu or coordinator_address:
    if coordinator_address is None or process_count is None or process_index is None:
      raise errors.UserError("--multiprocess_gpu needs --coordinator_address=HOST:PORT, "
                             "--process_count=N and --process_index=I")
    if not 0 <= process_index < process_count:
      raise errors.UserError(f"--process_index={process_index} must be in [0, --process_count="
                             f"{process_count})")
    if _cpu_backend():
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, process_count, process_index)
  elif _on_tpu_pod():
    jax.distributed.initialize()


def joined() -> bool:
  """Whether this process has joined a multi-process run (here or by jax.distributed)."""
  return _client_state().client is not None


def process_index() -> int:
  """jax.process_index() without starting a backend (a runner must leave the TPU free)."""
  return _client_state().process_id


def process_count() -> int:
  return _client_state().num_processes


def own_flags() -> dict:
  """The flags that join this process's pod (as `initialize` takes them), also where it
  joined without flags (TPU VMs): for commands it starts on every host."""
  state = _client_state()
  return {"multiprocess_gpu": True, "coordinator_address": state.coordinator_address,
          "process_count": state.num_processes, "process_index": state.process_id}


def is_writer() -> bool:
  """True on the one process that writes files that are not collective computations."""
  return process_index() == 0


def _client_state():
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  return distributed.global_state


def _unique(name: str) -> str:
  """`name` numbered by how often this process has used it (the service's ids are single-use)."""
  _uses[name] += 1
  return f"gqa_flax/{name}/{_uses[name]}"


def barrier(name: str, timeout_ms: int = _TIMEOUT_MS) -> None:
  """Blocks until every process has reached the barrier `name`."""
  if joined():
    _client_state().client.wait_at_barrier(_unique(name), timeout_ms)


def gather(name: str, value: Any, timeout_ms: int = _TIMEOUT_MS) -> list:
  """[every process's `value`] (JSON-serialisable), in process order, on every process."""
  if not joined():
    return [value]
  client, key = _client_state().client, _unique(name)
  client.key_value_set(f"{key}/{process_index()}", json.dumps(value))
  return [json.loads(client.blocking_key_value_get(f"{key}/{i}", timeout_ms))
          for i in range(process_count())]


def _failure_line(prog: str, message: str, index: int) -> str:
  return f"{prog}: error: {message} (process {index} of {process_count()})"


def at_failure(cleanup: Callable[[], None]) -> None:
  """Runs `cleanup` (e.g. killing a child process) before a watcher ends this process."""
  if cleanup not in _at_failure:
    _at_failure.append(cleanup)


def _end(line: str, acknowledge: Optional[Callable[[], None]] = None) -> NoReturn:
  """Prints `line`, runs the cleanups, tells the failed process it may go (`acknowledge`:
  last, so that process 0 does not take the coordination service down while this process
  still runs, which jax.distributed answers with an abort) and exits 1."""
  print(line, file=sys.stderr, flush=True)
  for cleanup in _at_failure:
    cleanup()
  if acknowledge is not None:
    try:
      acknowledge()
    except Exception:  # pylint: disable=broad-except  (the service has gone already)
      pass
  os._exit(1)  # pylint: disable=protected-access


def _try_get(client, key: str) -> Optional[str]:
  """The key's value, None while it is not set; raises when the service is unreachable."""
  try:
    return client.key_value_try_get(key)
  except Exception as e:  # pylint: disable=broad-except
    if "NOT_FOUND" in str(e):
      return None
    raise


class _Peers:
  """When each other process's beat last changed (this process's clock)."""

  def __init__(self, me: int):
    self.me, self.seen = me, {}  # process -> (beat, time.monotonic() it was first seen)

  def silent(self, client, now: float) -> Optional[int]:
    """A process that has beaten, has not exited, and whose beat has not changed for
    _SILENT_S seconds."""
    for other in range(process_count()):
      if other == self.me:
        continue
      beat = _try_get(client, f"{_ALIVE_KEY}/{other}")
      if beat is None or beat == _EXITED:
        continue
      if self.seen.get(other, (None,))[0] != beat:
        self.seen[other] = (beat, now)
      elif now - self.seen[other][1] > _SILENT_S:
        return other
    return None


def watch_for_failures(prog: str) -> None:
  """On a pod: a daemon thread that ends this process as soon as another process reports a
  failure (`fail`), printing that process's line, or stops beating (killed, host lost), or
  the coordination service is lost, so no host waits in a collective or a barrier for a peer
  that is gone. It polls the service twice a second, beats there, and stops at exit (marking
  this process exited). A single host does nothing."""
  if not joined():
    return
  client, me, stop = _client_state().client, process_index(), threading.Event()
  peers = _Peers(me)

  def check(beat: int) -> None:
    client.key_value_set(f"{_ALIVE_KEY}/{me}", str(beat), allow_overwrite=True)
    failure = _try_get(client, _FAILED_KEY)
    if failure is not None:
      failure = json.loads(failure)
      if failure["process"] == me:
        stop.set()
        return
      seen = lambda: client.key_value_set(f"{_FAILED_KEY}/seen/{me}", "1")
      line = _failure_line(prog, failure["message"], failure["process"])
      if is_writer():  # process 0 holds the service: the others must be done with it first
        seen()
        _await_seen(client, skip=(me, failure["process"]))
        _end(line)
      else:
        _end(line, acknowledge=seen)
    silent = peers.silent(client, time.monotonic())
    if silent is not None:
      _end(_failure_line(prog, f"a process stopped responding for {_SILENT_S:.0f} s (killed, "
                         "or its host lost); every process ends now; rerun the command on "
                         "every host to resume", silent))

  def watch():
    beat, unreachable_since = 0, None
    while not stop.wait(_WATCH_PERIOD_S):
      beat += 1
      try:
        check(beat)
        unreachable_since = None
      except Exception:  # pylint: disable=broad-except  (the service: process 0's)
        unreachable_since = unreachable_since or time.monotonic()
        if time.monotonic() - unreachable_since > _SILENT_S:
          _end(_failure_line(prog, "lost the coordination service that process 0 holds "
                             "(killed, or its host lost); every process ends now; rerun the "
                             "command on every host to resume", 0))

  watcher = threading.Thread(target=watch, name="gqa_flax_pod_watch", daemon=True)
  watcher.start()

  def stop_watching():
    stop.set()
    watcher.join()
    try:
      client.key_value_set(f"{_ALIVE_KEY}/{me}", _EXITED, allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the service has gone already)
      pass

  # A thread still inside a coordination-service call when the interpreter finalizes aborts
  # the process: stop it at exit, before finalization.
  atexit.register(stop_watching)


def fail(prog: str, message: str) -> NoReturn:
  """Ends this command with `prog: error: message`: on a pod, every process prints the same
  line (with this process's index) and exits 1 within seconds (`watch_for_failures`); the
  exit is immediate (jax.distributed's shutdown would wait for the processes that left)."""
  errors.silence_unraisable()
  if not joined():
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(1)
  client, me = _client_state().client, process_index()
  print(_failure_line(prog, message, me), file=sys.stderr, flush=True)
  try:
    client.key_value_set(_FAILED_KEY, json.dumps({"process": me, "message": message}))
  except Exception:  # pylint: disable=broad-except  (another process failed first)
    pass
  _await_seen(client, skip=(me,))  # they read it from the service, which may be ours
  os._exit(1)  # pylint: disable=protected-access


def _await_seen(client, skip) -> None:
  """Waits (a few seconds at most) until every process not in `skip` has read the failure
  and is about to exit (it acknowledges last); process 0, whose exit takes the coordination
  service down, then waits a moment more for those exits."""
  for other in range(process_count()):
    if other not in skip:
      try:
        client.blocking_key_value_get(f"{_FAILED_KEY}/seen/{other}", _ACK_MS)
      except Exception:  # pylint: disable=broad-except  (it is gone already)
        pass
  if is_writer():
    time.sleep(_EXIT_GRACE_S)


def broadcast(name: str, value: Any = None, timeout_ms: int = _TIMEOUT_MS) -> Any:
  """The writer's `value` (JSON-serialisable) on every process."""
  if not joined():
    return value
  client, key = _client_state().client, _unique(name)
  if is_writer():
    client.key_value_set(key, json.dumps(value))
  return json.loads(client.blocking_key_value_get(key, timeout_ms))
