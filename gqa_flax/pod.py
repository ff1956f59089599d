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
they need no accelerator and no compiled program).
"""
import argparse
import collections
import json
import os
from typing import Any, Optional

import jax

from gqa_flax import errors

_TIMEOUT_MS = 3_600_000  # a barrier waits up to an hour (a stage's conversion at XXL)
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


def broadcast(name: str, value: Any = None, timeout_ms: int = _TIMEOUT_MS) -> Any:
  """The writer's `value` (JSON-serialisable) on every process."""
  if not joined():
    return value
  client, key = _client_state().client, _unique(name)
  if is_writer():
    client.key_value_set(key, json.dumps(value))
  return json.loads(client.blocking_key_value_get(key, timeout_ms))
