"""A simulated pod for the tests: N processes x D CPU devices on one machine.

Each process runs the same command with T5X's multi-process flags (`--multiprocess_gpu
--coordinator_address=127.0.0.1:PORT --process_count=N --process_index=I`), which on the CPU
backend join a jax.distributed run with gloo collectives. Every run is bounded: past its
timeout (or when one process fails) the processes still running are killed by their PIDs,
so a deadlock fails the test instead of hanging it.

A `python -m` command is forked from a fork server (gqa_flax.reproduce.forkserver, held to
`python -m` by test_forkserver.py), one per process slot and environment, kept for the test
session: it skips the ~6 s of imports of a fresh interpreter. `forked=False` starts fresh
interpreters, each in its own process group (a command whose children must die with it).

  results = run_pod(argv, timeout=300)           # [Result] per process, rc 0 asserted
  result = run_single(argv, devices=8)           # the same command in one process
"""
import atexit
import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

from gqa_flax.reproduce.forkserver import ForkedProcess, ForkServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST_XLA = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


@dataclasses.dataclass
class Result:
  returncode: int
  output: str  # stdout and stderr together


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def env_for(devices: int, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
  """The suite's environment (less pytest's name of the current test: the same environment
  for every test, so their commands share fork servers) for `devices` CPU devices."""
  suite = {name: value for name, value in os.environ.items() if name != "PYTEST_CURRENT_TEST"}
  return dict(suite, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count={devices}",
              **(extra or {}))


def pod_flags(port: int, count: int, index: int) -> List[str]:
  return ["--multiprocess_gpu", f"--coordinator_address=127.0.0.1:{port}",
          f"--process_count={count}", f"--process_index={index}"]


_LOGS = tempfile.mkdtemp(prefix="pod-logs-")  # each process's output, removed when the tests end
atexit.register(shutil.rmtree, _LOGS, ignore_errors=True)
_SERVERS: Dict[Tuple[Tuple[str, str], ...], List[ForkServer]] = {}


def _new_log() -> str:
  """The path of a new empty file under _LOGS."""
  fd, path = tempfile.mkstemp(suffix=".log", dir=_LOGS)
  os.close(fd)
  return path


def _fork_servers(env: Dict[str, str], count: int) -> List[ForkServer]:
  """`count` fork servers started with `env` (started once, closed when the tests end)."""
  servers = _SERVERS.setdefault(tuple(sorted(env.items())), [])
  while len(servers) < count:
    servers.append(ForkServer(env, cwd=ROOT))
  return servers[:count]


_FORKED: List[ForkedProcess] = []  # every forked process, killed at the end if still running


@atexit.register
def _close_fork_servers() -> None:
  """Kills the forked processes still running (a failed test's), then closes the servers: a
  server reads its end of input only once its child has ended."""
  for process in _FORKED:
    if process.poll() is None:
      process.kill()
      process.wait()
  for servers in _SERVERS.values():
    for server in servers:
      server.close()


def _python_m(argv: Sequence[str]) -> Optional[List[str]]:
  """[MODULE, ARG, ...] of a `python -m MODULE ARG ...` command, else None."""
  return list(argv[2:]) if list(argv[:2]) == [sys.executable, "-m"] else None


class Pod:
  """N processes of one command, started at once; `wait` bounds them, `kill` ends them."""

  def __init__(self, argv: Sequence[str], num_processes: int = 2, devices_per_process: int = 4,
               env: Optional[Dict[str, str]] = None,
               process_args: Dict[int, Sequence[str]] = None, forked: bool = True,
               distributed: bool = True):
    """process_args: {process index: extra arguments of that process only}; distributed:
    pass the multi-process flags (a jax.distributed run, even of one process)."""
    port = free_port()
    env = env_for(devices_per_process, env)
    commands = [list(argv) + list((process_args or {}).get(i, ()))
                + (pod_flags(port, num_processes, i) if distributed else [])
                for i in range(num_processes)]
    self.logs = [_new_log() for _ in commands]
    if forked and _python_m(argv):
      servers = _fork_servers(env, num_processes)
      self.processes = [server.start(_python_m(command), log)
                        for server, command, log in zip(servers, commands, self.logs)]
      _FORKED.extend(self.processes)
    else:
      self.processes = []
      for command, log in zip(commands, self.logs):
        with open(log, "w") as out:
          self.processes.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                                 stderr=subprocess.STDOUT,
                                                 start_new_session=True))

  def outputs(self) -> List[str]:
    texts = []
    for log in self.logs:
      with open(log) as f:
        texts.append(f.read())
    return texts

  def kill(self) -> None:
    """SIGKILL to each process still running (and a fresh interpreter's process group)."""
    for process in self.processes:
      if process.poll() is None:
        try:
          if isinstance(process, subprocess.Popen):
            os.killpg(process.pid, signal.SIGKILL)
          else:
            process.kill()
        except ProcessLookupError:
          pass
    for process in self.processes:
      process.wait()

  def exit_times(self, timeout: float) -> List[float]:
    """Seconds from now until each process exited by itself; all killed past `timeout`."""
    start, exited = time.time(), {}
    while len(exited) < len(self.processes) and time.time() < start + timeout:
      for i, process in enumerate(self.processes):
        if i not in exited and process.poll() is not None:
          exited[i] = time.time() - start
      time.sleep(0.1)
    self.kill()
    return [exited.get(i, float("inf")) for i in range(len(self.processes))]

  def wait(self, timeout: float, check: bool = True) -> List[Result]:
    """Waits for every process; kills all on timeout or on the first failure."""
    deadline = time.time() + timeout
    while any(p.poll() is None for p in self.processes):
      failed = any(p.poll() not in (None, 0) for p in self.processes)
      if failed or time.time() > deadline:
        self.kill()
        outputs = self.outputs()
        reason = "a process failed" if failed else f"timed out after {timeout:.0f} s"
        raise AssertionError(f"pod {reason}:\n" + "\n".join(
            f"--- process {i} (rc {p.returncode}):\n{out[-3000:]}"
            for i, (p, out) in enumerate(zip(self.processes, outputs))))
      time.sleep(0.2)
    results = [Result(p.returncode, out) for p, out in zip(self.processes, self.outputs())]
    if check:
      for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i} exited {result.returncode}:\n" \
            f"{result.output[-3000:]}"
    return results


def run_pod(argv: Sequence[str], timeout: float, num_processes: int = 2,
            devices_per_process: int = 4, env: Optional[Dict[str, str]] = None) -> List[Result]:
  return Pod(argv, num_processes, devices_per_process, env).wait(timeout)


def run_single(argv: Sequence[str], timeout: float, devices: int = 8,
               env: Optional[Dict[str, str]] = None, forked: bool = True) -> Result:
  """The same command in one process with `devices` CPU devices (the pod's reference)."""
  job = Pod(argv, 1, devices, env, forked=forked, distributed=False)
  try:
    return job.wait(timeout)[0]
  except AssertionError as e:
    raise AssertionError(f"single process: {e}") from None


def module(name: str, *args: str) -> List[str]:
  return [sys.executable, "-m", name, *args]
