"""A simulated pod for the tests: N processes x D CPU devices on one machine.

Each process runs the same command with T5X's multi-process flags (`--multiprocess_gpu
--coordinator_address=127.0.0.1:PORT --process_count=N --process_index=I`), which on the CPU
backend join a jax.distributed run with gloo collectives. Every run is bounded: past its
timeout (or when one process fails) the processes still running are killed by their PIDs,
so a deadlock fails the test instead of hanging it.

  results = run_pod(argv, timeout=300)           # [Result] per process, rc 0 asserted
  result = run_single(argv, devices=8)           # the same command in one process
"""
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

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
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
              XLA_FLAGS=f"{FAST_XLA} --xla_force_host_platform_device_count={devices}",
              **(extra or {}))


def pod_flags(port: int, count: int, index: int) -> List[str]:
  return ["--multiprocess_gpu", f"--coordinator_address=127.0.0.1:{port}",
          f"--process_count={count}", f"--process_index={index}"]


class Pod:
  """N processes of one command, started at once; `wait` bounds them, `kill` ends them."""

  def __init__(self, argv: Sequence[str], num_processes: int = 2, devices_per_process: int = 4,
               env: Optional[Dict[str, str]] = None,
               process_args: Dict[int, Sequence[str]] = None):
    """process_args: {process index: extra arguments of that process only}."""
    port = free_port()
    self.logs = [tempfile.TemporaryFile(mode="w+") for _ in range(num_processes)]
    self.processes = [
        subprocess.Popen(list(argv) + list((process_args or {}).get(i, ()))
                         + pod_flags(port, num_processes, i), cwd=ROOT,
                         env=env_for(devices_per_process, env), stdout=log,
                         stderr=subprocess.STDOUT, start_new_session=True)
        for i, log in enumerate(self.logs)]

  def outputs(self) -> List[str]:
    texts = []
    for log in self.logs:
      log.seek(0)
      texts.append(log.read())
    return texts

  def kill(self, sig: int = signal.SIGKILL) -> None:
    for process in self.processes:
      if process.poll() is None:
        try:
          os.killpg(process.pid, sig)
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
               env: Optional[Dict[str, str]] = None) -> Result:
  """The same command in one process with `devices` CPU devices (the pod's reference)."""
  try:
    completed = subprocess.run(list(argv), cwd=ROOT, env=env_for(devices, env), timeout=timeout,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  except subprocess.TimeoutExpired as e:
    raise AssertionError(f"single process timed out after {timeout} s:\n{e.output}") from None
  assert completed.returncode == 0, completed.stdout[-3000:]
  return Result(completed.returncode, completed.stdout)


def module(name: str, *args: str) -> List[str]:
  return [sys.executable, "-m", name, *args]
