"""The installed gqa-* console scripts.

Each prepares the process before anything imports TensorFlow or starts a JAX backend, then
runs its command: TensorFlow's C++ INFO lines off (`TF_CPP_MIN_LOG_LEVEL=1`), and where no
accelerator is attached (no TPU device file, no NVIDIA GPU) and JAX_PLATFORMS is unset, the
CPU backend (`JAX_PLATFORMS=cpu`), so that an installed libtpu does not print its errors about
a TPU that is not there. A value the user set for either variable is kept. TensorFlow sees no
GPU (it runs tf.data only), and the lines it prints at its start whatever the log level
(before its C++ logging reads it) are dropped (`quiet_tensorflow_start`): those of its GPU
support on a machine without one (`cudart_stub ... Could not find cuda drivers`, `failed call
to cuInit`) and, on CPUs with AVX-512 VNNI/BF16, oneDNN's notice that results may differ in
rounding. Library INFO logs (Orbax, seqio) are turned off
by the gin commands (`gin_utils.run`) unless --verbosity is given.
"""
import contextlib
import glob
import importlib
import os
import sys
import tempfile
from typing import Callable, Iterator, Sequence

_TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")  # TPU v2-v4; v5e and later
_GPU_DEVICES = ("/dev/nvidia[0-9]*",)


def _attached(patterns) -> bool:
  return any(glob.glob(pattern) for pattern in patterns)


def prepare_process() -> None:
  """Sets the environment defaults of the module docstring."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if "JAX_PLATFORMS" not in os.environ and not _attached(_TPU_DEVICES + _GPU_DEVICES):
    os.environ["JAX_PLATFORMS"] = "cpu"


# What TensorFlow prints at its start, before or regardless of TF_CPP_MIN_LOG_LEVEL: its GPU
# support on a machine without a GPU (the stub's INFO line, absl's note before it, the failed
# cuInit) and oneDNN's INFO notice on CPUs it accelerates (port.cc).
_TENSORFLOW_START_LINES = ("cudart_stub.cc", "All log messages before absl::InitializeLog() is called",
                           "failed call to cuInit", "oneDNN custom operations are on")


@contextlib.contextmanager
def quiet_tensorflow_start() -> Iterator[None]:
  """Runs the block (imports); if TensorFlow was imported, hides the GPUs from it (it only
  runs tf.data; T5X does the same), which makes it probe CUDA now rather than at its first op.
  What both print goes to stderr without TensorFlow's start lines, unless TF_CPP_MIN_LOG_LEVEL
  is 0 (everything kept)."""
  keep_all = os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") == "0"
  with contextlib.nullcontext() if keep_all else _stderr_without(_TENSORFLOW_START_LINES):
    yield
    _hide_gpus_from_tensorflow()


@contextlib.contextmanager
def _stderr_without(markers: Sequence[str]) -> Iterator[None]:
  """Runs the block with file descriptor 2 (C++ libraries' output too) in a temporary file,
  then writes its lines to stderr, less those containing one of `markers`."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors="replace").splitlines(keepends=True):
        if not any(marker in line for marker in markers):
          sys.stderr.write(line)
      sys.stderr.flush()


def _hide_gpus_from_tensorflow() -> None:
  if "tensorflow" in sys.modules:
    sys.modules["tensorflow"].config.set_visible_devices([], "GPU")


def _command(module: str, function: str) -> Callable[[], None]:
  """The console script that prepares the process, then runs `module.function()` (its return
  value is the exit status)."""
  def run() -> None:
    prepare_process()
    with quiet_tensorflow_start():
      command = getattr(importlib.import_module(module), function)
    sys.exit(command())
  return run


train = _command("gqa_flax.train", "console")
evaluate = _command("gqa_flax.eval", "console")
infer = _command("gqa_flax.infer", "console")
convert = _command("gqa_flax.convert", "main")
reproduce = _command("gqa_flax.reproduce.cli", "console")
plan = _command("gqa_flax.planning.plan", "console")
demo = _command("gqa_flax.demo", "main")
