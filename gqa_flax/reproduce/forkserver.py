"""A fork server for the reproduction's stage commands: the libraries every stage imports
(TensorFlow, JAX, Flax, Orbax, seqio: ~6 s of each stage process on the 2-core machine) are
imported once per run, and each stage's `python -m MODULE ARGS` runs in a process forked
from the server.

The server imports libraries only: it creates no JAX backend and imports no stage module
(those define their absl flags when the child runs them as `__main__`), so a child starts as
`python -m MODULE ARGS` would, in the server's environment, minus the imports. It runs
MODULE with runpy as `python -m` does, its output appended to the stage's log, and ends as
an interpreter does (non-daemon threads joined, atexit handlers run, the exit code of
SystemExit or 1 after an uncaught exception's traceback).

The runner talks to the server over its stdin/stdout, one JSON line each way:
  server: {"ready": true} once the libraries are imported
  runner: {"argv": [MODULE, ARG, ...], "log": PATH}
  server: {"pid": PID} at the fork, then {"exit": CODE} when the child ended (-N: signal N)
End of input ends the server. Used by `runner.run_all`; `python -m` of this module is the
server itself.
"""
import functools
import gc
import importlib
import json
import os
import runpy
import select
import signal
import subprocess
import sys
import time
from typing import Dict, List, Optional

from gqa_flax import console

# Imported by the server before any fork: the libraries behind every stage, none of the stage
# modules (python -m gqa_flax.train, .convert, .data.prepare, .reproduce.heldout/evaluate/timing).
PRELOAD = ("tensorflow", "jax", "flax", "optax", "orbax.checkpoint", "seqio", "gin",
           "gqa_flax.training.loop", "gqa_flax.training.evaluation",
           "gqa_flax.checkpoints.convert", "gqa_flax.decoding")


class ServerError(RuntimeError):
  """The fork server ended or answered out of turn."""


class ForkedProcess:
  """A stage command forked from the server; `wait`, `poll` and `kill` as subprocess.Popen's."""

  def __init__(self, server: "ForkServer", pid: int):
    self._server = server
    self.pid = pid
    self.returncode: Optional[int] = None

  def wait(self, timeout: Optional[float] = None) -> int:
    if self.returncode is None:
      reply = self._server.read_reply(timeout, argv=[str(self.pid)])
      self.returncode = reply["exit"]
    return self.returncode

  def poll(self) -> Optional[int]:
    try:
      return self.wait(timeout=0)
    except subprocess.TimeoutExpired:
      return None

  def kill(self) -> None:
    if self.returncode is None:
      try:
        os.kill(self.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass


class ForkServer:
  """The server process, started with the stages' environment `env` in the working directory
  `cwd` (this process's by default); one command at a time."""

  def __init__(self, env: Dict[str, str], cwd: Optional[str] = None):
    self._process = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=cwd, bufsize=0)
    self._buffer = b""
    self.read_reply(None, argv=["ready"])

  def read_reply(self, timeout: Optional[float], argv: List[str]) -> dict:
    """The server's next JSON line; subprocess.TimeoutExpired when none came in `timeout`."""
    deadline = None if timeout is None else time.monotonic() + timeout
    fd = self._process.stdout.fileno()
    while b"\n" not in self._buffer:
      left = None if deadline is None else max(0.0, deadline - time.monotonic())
      if not select.select([fd], [], [], left)[0]:
        raise subprocess.TimeoutExpired(argv, timeout)
      chunk = os.read(fd, 65536)
      if not chunk:
        raise self._ended()
      self._buffer += chunk
    line, self._buffer = self._buffer.split(b"\n", 1)
    return json.loads(line)

  def _ended(self) -> ServerError:
    return ServerError(f"the stage fork server ended (exit {self._process.wait()}); its error "
                       "is above")

  def start(self, argv: List[str], log: str) -> ForkedProcess:
    """Forks `python -m argv[0] argv[1:]` with its output appended to the file `log`."""
    try:
      self._process.stdin.write((json.dumps({"argv": list(argv), "log": log}) + "\n").encode())
    except BrokenPipeError:
      raise self._ended() from None
    return ForkedProcess(self, self.read_reply(None, argv)["pid"])

  def close(self) -> None:
    self._process.stdin.close()
    self._process.wait()


def _become_stage(argv: List[str], log: str) -> None:
  """In the forked child: output to `log`, no input, then `python -m argv[0] argv[1:]`."""
  out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
  os.dup2(out, 1)
  os.dup2(out, 2)
  os.close(out)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  sys.stdout.reconfigure(line_buffering=True)
  sys.argv = list(argv)
  runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


def _reply(replies, **message) -> None:
  """One JSON line to the runner. A runner that is gone (it ended with its error line after
  its stage was killed) ends the server at once and quietly: nothing is left to serve."""
  try:
    replies.write(json.dumps(message) + "\n")
    replies.flush()
  except BrokenPipeError:
    os._exit(0)  # pylint: disable=protected-access


def serve() -> None:
  """The server's loop; returns only in a forked child, which then runs its command. Ctrl-C
  (SIGINT to the terminal's process group) is the runner's to handle: the server ignores it,
  a child gets it as `python -m` would (KeyboardInterrupt)."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  requests = os.fdopen(os.dup(0), "r")
  replies = os.fdopen(os.dup(1), "w")
  os.dup2(2, 1)  # what the imports print goes to stderr, not into the replies
  with console.quiet_tensorflow_start():
    for name in PRELOAD:
      importlib.import_module(name)
  gc.freeze()  # the children's collections skip the imported objects (no copy-on-write)
  reply = functools.partial(_reply, replies)
  reply(ready=True)
  for line in requests:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
      signal.signal(signal.SIGINT, signal.default_int_handler)
      requests.close()
      replies.close()
      _become_stage(request["argv"], request["log"])
      return
    reply(pid=pid)
    reply(exit=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))


if __name__ == "__main__":
  serve()
