"""The installed gqa-* console scripts.

Each prepares the process before anything imports TensorFlow or starts a JAX backend, then
runs its command: TensorFlow's C++ INFO lines off (`TF_CPP_MIN_LOG_LEVEL=1`), and where no
accelerator is attached (no TPU device file, no NVIDIA GPU) and JAX_PLATFORMS is unset, the
CPU backend (`JAX_PLATFORMS=cpu`), so that an installed libtpu does not print its errors about
a TPU that is not there. A value the user set for either variable is kept. Library INFO logs
(Orbax, seqio) are turned off by the gin commands (`gin_utils.run`) unless --verbosity is given.
"""
import glob
import importlib
import os
import sys
from typing import Callable

_TPU_DEVICES = ("/dev/accel*", "/dev/vfio/[0-9]*")  # TPU v2-v4; v5e and later
_GPU_DEVICES = ("/dev/nvidia[0-9]*",)


def _attached(patterns) -> bool:
  return any(glob.glob(pattern) for pattern in patterns)


def prepare_process() -> None:
  """Sets the environment defaults of the module docstring."""
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  if "JAX_PLATFORMS" not in os.environ and not _attached(_TPU_DEVICES + _GPU_DEVICES):
    os.environ["JAX_PLATFORMS"] = "cpu"


def _command(module: str, function: str) -> Callable[[], None]:
  """The console script that prepares the process, then runs `module.function()` (its return
  value is the exit status)."""
  def run() -> None:
    prepare_process()
    sys.exit(getattr(importlib.import_module(module), function)())
  return run


train = _command("gqa_flax.train", "console")
evaluate = _command("gqa_flax.eval", "console")
infer = _command("gqa_flax.infer", "console")
convert = _command("gqa_flax.convert", "main")
reproduce = _command("gqa_flax.reproduce.cli", "console")
plan = _command("gqa_flax.planning.plan", "console")
demo = _command("gqa_flax.demo", "main")
