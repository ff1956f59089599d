"""T5X's gin command line: --gin_file (repeatable), --gin_bindings, --gin.NAME=VALUE,
--gin_search_paths (the repo's configs/ always searched), --tfds_data_dir, and the multi-process
flags --multiprocess_gpu, --coordinator_address, --process_count, --process_index."""
import importlib.util  # gin 0.5.0 uses importlib.util without importing it
import os
import sys
import re
from typing import Callable, List, Sequence

from absl import app, flags
import gin
from gin import config as gin_config
from gin import resource_reader
import seqio

from gqa_flax import pod

CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "configs")

flags.DEFINE_multi_string("gin_file", [], "Gin files to parse, in order (searched in "
                          "--gin_search_paths).")
flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings, e.g. 'MODEL_DIR=\"/tmp/run\"'.")
flags.DEFINE_list("gin_search_paths", [], f"Directories searched for gin files; {CONFIGS_DIR} "
                  "is always searched last.")
flags.DEFINE_string("tfds_data_dir", None, "Overrides the TFDS data directory of seqio tasks.")
flags.DEFINE_bool("multiprocess_gpu", False, "Join a GPU/CPU cluster (jax.distributed) with "
                  "--coordinator_address, --process_count and --process_index; on the CPU backend "
                  "a CPU pod with gloo collectives. TPU VMs join without flags.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0's coordinator.")
flags.DEFINE_integer("process_count", None, "Number of processes of the multi-process run.")
flags.DEFINE_integer("process_index", None, "Index of this process in the multi-process run.")
FLAGS = flags.FLAGS

_MACRO_BINDING = re.compile(r"\s*([A-Z][A-Z0-9_]*)\s*=")


def rewrite_gin_args(argv: Sequence[str]) -> List[str]:
  """`--gin.NAME=VALUE` -> `--gin_bindings=NAME=VALUE` (T5X's gin_utils.rewrite_gin_args)."""
  return [f"--gin_bindings={arg[len('--gin.'):]}" if arg.startswith("--gin.") else arg
          for arg in argv]


def _package_file_exists(config_path: str) -> bool:
  """gin's package-path lookup (`a/b/f.gin` as file `f.gin` of package `a.b`), made safe.

  gin 0.5.0's own check crashes (TypeError) when a plain folder in the working directory,
  e.g. a run's output `runs/`, shadows `configs/runs/` as a namespace package, and it logs an
  ERROR line for every search-path miss. This one just answers.
  """
  head, filename = os.path.split(config_path)
  try:
    spec = importlib.util.find_spec(head.replace("/", "."))
  except (ImportError, ValueError):
    return False
  return bool(spec and spec.origin) and os.path.isfile(
      os.path.join(os.path.dirname(spec.origin), filename))


gin_config._FILE_READERS[:] = [  # pylint: disable=protected-access
    (reader, _package_file_exists if exists is resource_reader.system_path_file_exists else exists)
    for reader, exists in gin_config._FILE_READERS]  # pylint: disable=protected-access


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              gin_search_paths: Sequence[str] = ()) -> None:
  """Parses files then bindings; a binding of an undefined MACRO fails naming it."""
  for path in list(gin_search_paths) + [CONFIGS_DIR]:
    gin.add_config_file_search_path(path)
  gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
  for binding in gin_bindings:
    match = _MACRO_BINDING.match(binding)
    if match:
      try:
        gin.query_parameter(f"%{match.group(1)}")
      except ValueError:
        raise ValueError(f"unknown macro {match.group(1)} in binding {binding!r}: no gin file "
                         f"({', '.join(gin_files)}) defines it; check the spelling") from None
  gin.parse_config_files_and_bindings(None, gin_bindings, finalize_config=False)


def run(main: Callable[[], None], join_pod: bool = True) -> None:
  """Console-script entry: parses flags (after the --gin.X rewrite), joins the pod (unless
  `join_pod` is False: gqa-plan compiles for a slice it is not on) and parses gin, then
  `main()`."""
  def wrapped(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments {argv[1:]}; pass settings as --gin.NAME=VALUE")
    if join_pod:
      pod.initialize(FLAGS.multiprocess_gpu, FLAGS.coordinator_address, FLAGS.process_count,
                     FLAGS.process_index)
    if FLAGS.tfds_data_dir:
      seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)
    parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
    main()
  app.run(wrapped, argv=rewrite_gin_args(sys.argv))
