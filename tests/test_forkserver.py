"""The reproduction's fork server runs a stage command as `python -m` does (same output, exit
code, threads joined, atexit run, a fresh module each time), and its children can be killed."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from gqa_flax.reproduce.forkserver import PRELOAD, ForkServer, ServerError

PROBE = textwrap.dedent('''\
    import atexit, json, sys, threading, time
    from absl import flags
    from jax._src import xla_bridge
    flags.DEFINE_string("probe_flag", "x", "defined at import, as a stage module's flags are")
    print("backend before the module:", xla_bridge.backends_are_initialized())
    print("argv:", sys.argv[1:])
    print("to stderr", file=sys.stderr)
    atexit.register(lambda: print("atexit ran"))
    if sys.argv[1] == "thread":
      threading.Thread(target=lambda: (time.sleep(0.5), print("thread finished"))).start()
    elif sys.argv[1] == "raise":
      raise ValueError("probe failed")
    elif sys.argv[1] == "sleep":
      time.sleep(120)
    elif sys.argv[1] == "modules":
      print("modules:", json.dumps(sorted(sys.modules)))
    elif sys.argv[1] == "exit":
      sys.exit(int(sys.argv[2]))
    ''')


@pytest.fixture(scope="module")
def probe_env(tmp_path_factory):
  directory = tmp_path_factory.mktemp("probe")
  (directory / "stage_probe.py").write_text(PROBE)
  return {**os.environ, "PYTHONPATH": str(directory)}


@pytest.fixture(scope="module")
def server(probe_env):
  server = ForkServer(probe_env)
  yield server
  server.close()


def _forked(server, tmp_path, *args):
  log = tmp_path / f"log-{'-'.join(args)}"
  code = server.start(["stage_probe", *args], str(log)).wait(timeout=60)
  return code, log.read_text()


def _reference(env, *args):
  done = subprocess.run([sys.executable, "-m", "stage_probe", *args], env=env,
                        capture_output=True, text=True, timeout=120)
  return done.returncode, done.stdout + done.stderr


@pytest.mark.parametrize("args", [("thread",), ("exit", "3"), ("exit", "0")])
def test_forked_stage_runs_as_python_dash_m(server, probe_env, tmp_path, args):
  code, output = _forked(server, tmp_path, *args)
  reference_code, reference = _reference(probe_env, *args)
  assert code == reference_code == (int(args[1]) if args[0] == "exit" else 0)
  # the same lines (stdout and stderr share the log; a pipe orders them differently)
  assert sorted(output.splitlines()) == sorted(reference.splitlines())
  assert "backend before the module: False" in output and "atexit ran" in output


def test_uncaught_exception_exits_1_with_its_traceback(server, probe_env, tmp_path):
  code, output = _forked(server, tmp_path, "raise")
  assert code == _reference(probe_env, "raise")[0] == 1
  assert output.strip().splitlines()[-2:] == ["ValueError: probe failed", "atexit ran"]


def test_each_stage_is_a_fresh_module(server, tmp_path):
  """The probe defines an absl flag at import: a second run would fail if it were imported
  in the server or kept from the first run."""
  for _ in range(2):
    code, output = _forked(server, tmp_path, "exit", "0")
    assert code == 0, output


def test_stage_can_be_killed_and_server_goes_on(server, tmp_path):
  process = server.start(["stage_probe", "sleep"], str(tmp_path / "log"))
  with pytest.raises(subprocess.TimeoutExpired):
    process.wait(timeout=1)
  process.kill()
  assert process.wait(timeout=30) == -9
  assert _forked(server, tmp_path, "exit", "5")[0] == 5


def test_server_preloads_no_stage_module(server, tmp_path):
  """A stage finds what the server imported (PRELOAD) and no stage module: each stage imports
  its own command afresh."""
  stage_modules = {"gqa_flax.train", "gqa_flax.convert", "gqa_flax.data.prepare",
                   "gqa_flax.reproduce.heldout", "gqa_flax.reproduce.evaluate",
                   "gqa_flax.reproduce.timing"}
  code, output = _forked(server, tmp_path, "modules")
  line, = [l for l in output.splitlines() if l.startswith("modules: ")]
  loaded = set(json.loads(line[len("modules: "):]))
  assert code == 0 and set(PRELOAD) <= loaded and not stage_modules & loaded, output


def test_a_dead_server_is_named(probe_env, tmp_path):
  server = ForkServer(probe_env)
  server._process.kill()
  server._process.wait()
  with pytest.raises(ServerError, match="fork server ended"):
    server.start(["stage_probe", "exit", "0"], str(tmp_path / "log")).wait(timeout=10)


def test_server_ends_quietly_when_its_runner_is_gone(probe_env, tmp_path):
  """The runner exits (its pod failed) right after killing its stage: the server, whose reply
  then has no reader, ends with no traceback on the runner's stderr."""
  server = subprocess.Popen([sys.executable, "-m", "gqa_flax.reproduce.forkserver"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=probe_env)
  assert server.stdout.readline().strip() == b'{"ready": true}'
  request = {"argv": ["stage_probe", "sleep"], "log": str(tmp_path / "log")}
  server.stdin.write((json.dumps(request) + "\n").encode())
  server.stdin.flush()
  pid = json.loads(server.stdout.readline())["pid"]
  server.stdout.close()  # the runner is gone
  os.kill(pid, 9)
  assert server.wait(timeout=60) == 0
  assert b"Traceback" not in server.stderr.read()
  server.stdin.close()
  server.stderr.close()


def test_ctrl_c_interrupts_the_stage_not_the_server(probe_env, tmp_path):
  """Ctrl-C signals the terminal's whole process group: the stage ends as `python -m` would
  (KeyboardInterrupt), the server carries on quietly, and the runner decides what follows."""
  server = subprocess.Popen([sys.executable, "-m", "gqa_flax.reproduce.forkserver"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=probe_env)
  assert server.stdout.readline().strip() == b'{"ready": true}'

  def request(*args):
    log = tmp_path / f"log-{'-'.join(args)}"
    server.stdin.write((json.dumps({"argv": ["stage_probe", *args], "log": str(log)}) + "\n"
                        ).encode())
    server.stdin.flush()
    return json.loads(server.stdout.readline())["pid"], log

  pid, log = request("sleep")
  deadline = time.time() + 60
  while "argv:" not in (log.read_text() if log.exists() else "") and time.time() < deadline:
    time.sleep(0.1)
  os.kill(server.pid, signal.SIGINT)
  os.kill(pid, signal.SIGINT)
  code = json.loads(server.stdout.readline())["exit"]
  # As from a terminal: SIGINT not ignored, whatever this process inherited (a suite started
  # in the background of a non-interactive shell ignores it, and so would the reference).
  reference = subprocess.Popen([sys.executable, "-u", "-m", "stage_probe", "sleep"],
                               env=probe_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  for line in reference.stdout:  # signalled once past its imports, as the stage was
    if line.startswith(b"argv:"):
      break
  reference.send_signal(signal.SIGINT)
  try:
    reference.wait(timeout=60)
  except subprocess.TimeoutExpired:  # say how the reference handled signals
    with open(f"/proc/{reference.pid}/status") as status:
      state = [line for line in status if line.startswith(("State", "Threads", "Sig"))]
    reference.kill()
    raise AssertionError(f"the reference did not end on SIGINT: {state}") from None
  assert code == reference.returncode == -signal.SIGINT
  assert "KeyboardInterrupt" in log.read_text()
  request("exit", "4")
  assert json.loads(server.stdout.readline())["exit"] == 4  # the server goes on
  server.stdin.close()
  assert server.wait(timeout=60) == 0
  assert b"Traceback" not in server.stderr.read()
  server.stdout.close()
  server.stderr.close()
