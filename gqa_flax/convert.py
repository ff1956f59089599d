"""gqa-convert: multi-head T5 checkpoint -> GQA-G / MQA Orbax checkpoint.

  gqa-convert --src SRC --dst DST --num_kv_heads G [--cross_num_kv_heads G2]
              [--method mean|first|random|grouped|aligned]
              [--calibration_task_gin GIN [--calibration_examples N]] [--seed N]
              [--dtype float32|bfloat16] [--overwrite]
"""
import argparse
import contextlib
import functools
import os
import signal
import sys

from typing import Dict, Iterator

import jax
import numpy as np

from gqa_flax import errors, pod
from gqa_flax.checkpoints.reader import open_checkpoint
from gqa_flax.checkpoints.convert import (DTYPES, METHODS, convert_checkpoint,
                                          discard_temporary_at_exit)

_POD_WAIT_MS = 24 * 3_600_000  # the other hosts wait up to a day (XXL from gs:// is hours)


def parse_args(argv=None) -> argparse.Namespace:
  parser = errors.ArgumentParser(
      prog="gqa-convert",
      description="Convert a multi-head T5.1.1 checkpoint into grouped-query attention (GQA-G, "
      "or MQA with G=1) in the decoder's self- and cross-attention (Ainslie et al. 2023, 2.1). "
      "SRC may be an Orbax checkpoint (ours or T5X's), a legacy T5X checkpoint_<step> directory "
      "(or its msgpack file) or a HF transformers T5 v1.1 directory; DST is an Orbax checkpoint "
      "for gqa_flax.checkpoints.load and the trainer. Both may be gs:// URLs. Only the "
      "decoder's key/value kernels change; everything else is copied bit for bit. Optimizer "
      "state is NOT carried over: "
      "uptraining restarts Adafactor state, as T5X's sparse-upcycling recipe does.")
  parser.add_argument("--src", required=True, help="source checkpoint (format detected)")
  parser.add_argument("--dst", required=True, help="Orbax checkpoint directory to create")
  parser.add_argument("--num_kv_heads", type=int, required=True,
                      help="key/value heads G of decoder self-attention (must divide the heads)")
  parser.add_argument("--cross_num_kv_heads", type=int, default=None,
                      help="key/value heads of encoder-decoder attention (default: G)")
  parser.add_argument("--method", choices=METHODS, default="mean",
                      help="mean: mean-pool each group's heads (paper); first: keep each group's "
                      "first head; random: fresh initialisation; grouped: mean-pool groups of "
                      "alike heads, not neighbouring ones; aligned: grouped, each head rotated "
                      "onto its group's mean first (default: mean)")
  parser.add_argument("--calibration_task_gin", default=None,
                      help="--method aligned: align heads in the metric of their key/value "
                      "inputs on this task's examples (a gin file setting MIXTURE_OR_TASK_NAME "
                      "and TASK_FEATURE_LENGTHS, e.g. the pre-training task's; default: align "
                      "the kernels themselves)")
  parser.add_argument("--calibration_split", default="train")
  parser.add_argument("--calibration_examples", type=errors.positive_int, default=256)
  parser.add_argument("--calibration_batch_size", type=errors.positive_int, default=32)
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed of --method random")
  parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                      help="storage dtype of the floating arrays (default: as in SRC)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  pod.add_flags(parser)
  return parser.parse_args(argv)


def _calibration_grams(args: argparse.Namespace) -> Dict[str, np.ndarray]:
  """The source model's key/value input grams on the calibration task (`calibration.py`)."""
  # Imported here: the data pipeline brings TensorFlow, which plain conversions do not need.
  from gqa_flax import calibration  # pylint: disable=import-outside-toplevel
  from gqa_flax.training import data_pipeline  # pylint: disable=import-outside-toplevel
  if args.method != "aligned":
    raise errors.UserError(f"--calibration_task_gin calibrates --method aligned, not "
                           f"{args.method}; drop it or pass --method aligned")
  source = open_checkpoint(args.src)
  cfg = data_pipeline.from_task_gin(args.calibration_task_gin, args.calibration_split,
                                    args.calibration_batch_size)
  return calibration.kv_input_grams(source.config, source.arrays,
                                    calibration.task_batches(cfg, args.calibration_examples))


def _convert(args: argparse.Namespace) -> str:
  """Converts; returns the summary line, or raises ValueError / OSError."""
  grams, calibrated = None, None
  if args.calibration_task_gin:
    grams = _calibration_grams(args)
    calibrated = {"task_gin": args.calibration_task_gin, "split": args.calibration_split,
                  "examples": args.calibration_examples}
  config = convert_checkpoint(args.src, args.dst, args.num_kv_heads, args.cross_num_kv_heads,
                              args.method, args.seed, args.dtype, args.overwrite,
                              grams=grams, calibration=calibrated)
  return (f"wrote {config.attention_name} checkpoint (num_kv_heads={config.num_kv_heads}, "
          f"cross_num_kv_heads={config.cross_num_kv_heads}) to {args.dst}")


def _stop(dst: str, signum: int, frame) -> None:
  """Ctrl-C or SIGTERM: one line (after the progress bar's), and the process ends at once,
  Orbax's writer threads with it (an exception raised into a running conversion could be
  swallowed by a finalizer, and the threads would log their failures); its temporary DST is
  removed once it has ended."""
  del frame
  print(f"\ngqa-convert: error: interrupted ({signal.Signals(signum).name}); {dst} was not "
        "written and nothing was left behind; rerun the command to convert", file=sys.stderr,
        flush=True)
  discard_temporary_at_exit(dst)
  os._exit(1)  # pylint: disable=protected-access


@contextlib.contextmanager
def _stopped_by_signals(dst: str) -> Iterator[None]:
  """Ctrl-C and SIGTERM during the block end the process (`_stop`); the handlers they had
  before are back after it (main() called in a process that goes on, e.g. a test)."""
  previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
  for signum in previous:
    signal.signal(signum, functools.partial(_stop, dst))
  try:
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


def main(argv=None) -> int:
  """On a pod (every host runs the command) process 0 converts and the others wait for its
  outcome, so DST is written once and every host exits alike."""
  args = parse_args(argv)
  with _stopped_by_signals(args.dst):
    return _run(args)


def _run(args: argparse.Namespace) -> int:
  outcome = {}
  try:
    pod.initialize(**pod.flags_of(args))
    jax.devices()  # every host: starting the backend of a pod is itself a collective step
    if pod.is_writer():
      outcome = {"ok": _convert(args)}
  except (ValueError, OSError) as e:
    outcome = {"error": errors.one_line(e)}
  except Exception as e:  # a bug: the other hosts must not wait for ever; then the traceback
    pod.broadcast("convert/outcome", {"error": f"conversion failed on process 0: {e!r}"})
    raise
  outcome = pod.broadcast("convert/outcome", outcome, timeout_ms=_POD_WAIT_MS)
  if "error" in outcome:
    errors.silence_unraisable()
    print(f"gqa-convert: error: {outcome['error']}", file=sys.stderr, flush=True)
    return 1
  print(outcome["ok"])
  return 0


if __name__ == "__main__":
  sys.exit(main())
