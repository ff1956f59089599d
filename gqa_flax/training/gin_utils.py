"""T5X's gin command line: --gin_file (repeatable), --gin_bindings, --gin.NAME=VALUE,
--gin_search_paths (the repo's configs/ always searched), --tfds_data_dir, the multi-process
flags --multiprocess_gpu, --coordinator_address, --process_count, --process_index, and the
vocabulary flag --gqa_vocab_path.

Gin files compose in any order (model, task, run): a file included twice is parsed once (the
first time), and `NAME = %gin.REQUIRED` declares a setting without undoing a value an earlier
file gave it. Before a command runs, every setting still REQUIRED is named in one line, and a
macro that a gin file assigns but no gin file ever uses (a typo, `BATCH_SZE = 8`) is warned of.
"""
import contextlib
import importlib.util  # gin 0.5.0 uses importlib.util without importing it
import glob
import inspect
import logging
import os
import re
import sys
import tokenize
import traceback
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Set

from absl import app, flags
import gin
from gin import config as gin_config
from gin import resource_reader
import seqio

from gqa_flax import errors, pod
from gqa_flax.data import vocab  # defines --gqa_vocab_path

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
_MACRO_REFERENCE = re.compile(r"%([A-Za-z_][\w.]*)")
_HELP_FLAGS = ("-h", "--help", "--helpshort", "-?")


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


def _resolve(config_file: str) -> str:
  """The real path gin would read for `config_file` (the name itself if none exists)."""
  prefixes = ([""] if os.path.isabs(config_file)
              else gin_config._LOCATION_PREFIXES)  # pylint: disable=protected-access
  for prefix in prefixes:
    candidate = os.path.join(prefix, config_file)
    if os.path.isfile(candidate):
      return os.path.realpath(candidate)
  return config_file


def _is_required(value) -> bool:
  """Whether a gin value is the `%gin.REQUIRED` placeholder."""
  return (isinstance(value, gin_config.ConfigurableReference)
          and value.configurable.name == "constant" and value.scopes == ["gin.REQUIRED"])


@contextlib.contextmanager
def _composing_files(parsed: List[str], reading: List[str]) -> Iterator[None]:
  """gin parsing where a file is read once (its real path appended to `parsed`; `reading` is
  the stack of files being read) and a `NAME = %gin.REQUIRED` macro leaves an earlier value
  of NAME in place."""
  parse_file, bind = gin_config.parse_config_file, gin_config.bind_parameter

  def parse_once(config_file, *args, **kwargs):
    path = _resolve(config_file)
    if path in parsed:
      return gin_config.ParsedConfigFileIncludesAndImports(config_file, [], [])
    parsed.append(path)
    reading.append(path)
    result = parse_file(config_file, *args, **kwargs)
    reading.pop()
    return result

  def bind_unless_declaration(key, value):
    name, selector = key[0], key[1]
    bound = gin_config._CONFIG.get((name, selector), {})  # pylint: disable=protected-access
    earlier = bound.get("value")
    if selector == "gin.macro" and _is_required(value) and earlier is not None \
        and not _is_required(earlier):
      return
    bind(key, value)

  gin_config.parse_config_file, gin_config.bind_parameter = parse_once, bind_unless_declaration
  try:
    yield
  finally:
    gin_config.parse_config_file, gin_config.bind_parameter = parse_file, bind


def _gin_error(error: Exception, current_file: str) -> errors.UserError:
  """A gin parsing error in one line: gin's message, where it is and the text there."""
  if isinstance(error, tokenize.TokenError):  # an unclosed bracket at the end of a file
    error = SyntaxError(error.args[0], (current_file, error.args[1][0], 0, ""))
  if isinstance(error, SyntaxError):
    message = error.msg
    text = (error.text or "").strip()
    where = f"{error.filename or 'binding'} line {error.lineno}{': ' + text if text else ''}"
    fix = "fix the gin syntax (a string value needs quotes: --gin.MODEL_DIR=\"'/tmp/run'\")"
  else:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
    message = lines[0] or type(error).__name__
    at = next((i for i, line in enumerate(lines) if line.startswith("In ")), None)
    where = "" if at is None else " ".join(lines[at:at + 2])[3:]
    fix = "fix the gin file or binding"
  return errors.UserError(f"gin: {message.rstrip('.')}{f' ({where})' if where else ''}; {fix}")


def parse_gin(gin_files: Sequence[str], gin_bindings: Sequence[str],
              gin_search_paths: Sequence[str] = ()) -> List[str]:
  """Parses files then bindings (files composing as the module docstring says); returns the
  files read, includes too. A binding of an undefined MACRO, or any gin error, is a UserError."""
  for path in list(gin_search_paths) + [CONFIGS_DIR]:
    gin.add_config_file_search_path(path)
  parsed: List[str] = []
  reading: List[str] = []
  try:
    with _composing_files(parsed, reading):
      gin.parse_config_files_and_bindings(gin_files, None, finalize_config=False)
    for binding in gin_bindings:
      match = _MACRO_BINDING.match(binding)
      if match and not _bound(match.group(1)):
        raise errors.UserError(
            f"unknown macro {match.group(1)} in binding {binding!r}: no gin file "
            f"({', '.join(gin_files)}) defines it; check the spelling")
    gin.parse_config_files_and_bindings(None, gin_bindings, finalize_config=False)
  except errors.UserError:
    raise
  except (ValueError, OSError, SyntaxError, tokenize.TokenError) as e:
    raise _gin_error(e, reading[-1] if reading else "") from None
  return parsed


def _bound(macro: str) -> bool:
  return (macro, "gin.macro") in gin_config._CONFIG  # pylint: disable=protected-access


def missing_settings() -> List[str]:
  """The macros and parameters still bound to %gin.REQUIRED."""
  missing = []
  for (scope, selector), params in gin_config._CONFIG.items():  # pylint: disable=protected-access
    for name, value in params.items():
      if _is_required(value):
        missing.append(scope if selector == "gin.macro" else
                       f"{scope + '/' if scope else ''}{selector}.{name}")
  return sorted(missing)


def unbound_parameters(configurable: Callable) -> List[str]:
  """`configurable`'s parameters that have no default and no gin binding, as `name.param`."""
  selector = f"{configurable.__module__}.{configurable.__name__}"
  missing = []
  for param in inspect.signature(configurable).parameters.values():
    if param.default is inspect.Parameter.empty and param.kind not in (
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
      try:
        gin.query_parameter(f"{selector}.{param.name}")
      except ValueError:
        missing.append(f"{configurable.__name__}.{param.name}")
  return missing


def check_complete(configurable: Optional[Callable] = None) -> None:
  """Raises a UserError naming every setting still REQUIRED, and every parameter of the
  command's `configurable` that nothing sets, and how to set them."""
  unbound = unbound_parameters(configurable) if configurable else []
  if unbound:
    raise errors.UserError(
        f"gin: {', '.join(unbound)} not set: no run gin file was given; pass one of "
        "configs/runs/ (--gin_file=runs/NAME.gin) or an experiments/*.gin that includes one")
  missing = missing_settings()
  if not missing:
    return
  task_hint = ("; a task gin file sets MIXTURE_OR_TASK_NAME and TASK_FEATURE_LENGTHS "
               "(--gin_file=experiments/tasks/cnn_dailymail.gin)"
               if {"MIXTURE_OR_TASK_NAME", "TASK_FEATURE_LENGTHS"} & set(missing) else "")
  raise errors.UserError(
      f"gin setting{'s' if len(missing) > 1 else ''} {', '.join(missing)} not set; pass "
      + " ".join(f"--gin.{name}=VALUE" for name in missing) + task_hint)


def _texts(paths: Sequence[str]) -> Dict[str, str]:
  """{path: its text} of the gin files among `paths` that exist."""
  texts = {}
  for path in paths:
    if os.path.isfile(path):
      with open(path) as f:
        texts[path] = f.read()
  return texts


def _bound_macro_references() -> Set[str]:
  """Macro names some binding of the parsed config refers to."""
  names = set()
  for params in gin_config._CONFIG.values():  # pylint: disable=protected-access
    for value in gin_config._iterate_flattened_values(params):  # pylint: disable=protected-access
      if isinstance(value, gin_config.ConfigurableReference) and \
          value.configurable.name == "macro":
        names.update(value.scopes)
  return names


def unused_macros(parsed_files: Sequence[str], read_by_code: Sequence[str] = ()) -> List[str]:
  """'NAME (file)' for each macro a parsed gin file assigns that nothing refers to: no binding
  of the config, no gin file under configs/ or among `parsed_files`, not `read_by_code`."""
  parsed = _texts(parsed_files)
  known = _texts(glob.glob(os.path.join(CONFIGS_DIR, "**", "*.gin"), recursive=True))
  referenced = _bound_macro_references() | set(read_by_code) | {
      name for text in {**known, **parsed}.values() for name in _MACRO_REFERENCE.findall(text)}
  unused = []
  for scope, selector in gin_config._CONFIG:  # pylint: disable=protected-access
    if selector != "gin.macro" or scope in referenced:
      continue
    files = [path for path, text in parsed.items()
             if re.search(rf"^\s*{re.escape(scope)}\s*=", text, re.MULTILINE)]
    if files:
      unused.append(f"{scope} ({_shown(files[-1])})")
  return sorted(unused)


def _shown(path: str) -> str:
  """`path` relative to the configs or working directory when it is under one."""
  for root in (CONFIGS_DIR, os.getcwd()):
    if path.startswith(root + os.sep):
      return os.path.relpath(path, root)
  return path


def help_text(prog: str, doc: str, flag_modules: Sequence[str] = ()) -> str:
  """`prog --help`: the command's docstring, then its flags (T5X's gin and pod flags, the
  vocabulary flag, and those of `flag_modules`)."""
  own = FLAGS.module_help(__name__)
  sections = [f"usage: {prog} --gin_file=FILE ... [--gin.NAME=VALUE ...] [flags]", doc.strip(),
              "flags:\n  --gin.NAME=VALUE: a gin binding, T5X's shorthand for "
              "--gin_bindings='NAME=VALUE';\n"
              "    strings need quotes: --gin.MODEL_DIR=\"'/tmp/run'\"\n"
              + own.strip().split("\n", 1)[1]]
  sections += [FLAGS.module_help(module) for module in [vocab.__name__, *flag_modules]]
  sections.append("All absl, TF and library flags: --helpfull.")
  return "\n\n".join(sections)


def run(main: Callable[[], None], prog: str, doc: str, join_pod: bool = True,
        flag_modules: Sequence[str] = (), read_by_code: Sequence[str] = (),
        require_complete: bool = True, configurable: Optional[Callable] = None) -> None:
  """Console-script entry: `--help` prints `help_text`; otherwise parses flags (after the
  --gin.X rewrite), turns library INFO logs off (unless --verbosity is given), joins the
  pod (unless `join_pod` is False: gqa-plan compiles for a slice it is not on) and watches
  it for failures, parses gin, warns of unused macros (`read_by_code`: macros the command
  reads itself), refuses an incomplete config (`require_complete`: REQUIRED settings, and
  `configurable`'s parameters that nothing binds), then `main()`. A
  UserError ends the command in one line, exit 1; on a pod, every process ends with it
  (`pod.fail`), and so does a bug (after its traceback)."""
  argv = rewrite_gin_args(sys.argv)
  if any(arg in _HELP_FLAGS for arg in argv[1:]):
    print(help_text(prog, doc, flag_modules))
    sys.exit(0)

  def wrapped(argv):
    if not FLAGS["verbosity"].present:  # our progress lines and every warning; no library INFO
      logging.getLogger("absl").setLevel(logging.WARNING)
    try:
      if len(argv) > 1:
        raise errors.UserError(f"unexpected arguments {' '.join(argv[1:])}; pass settings as "
                               "--gin.NAME=VALUE and files as --gin_file=FILE")
      if join_pod:
        pod.initialize(FLAGS.multiprocess_gpu, FLAGS.coordinator_address, FLAGS.process_count,
                       FLAGS.process_index)
        pod.watch_for_failures(prog)
      if FLAGS.tfds_data_dir:
        seqio.set_tfds_data_dir_override(FLAGS.tfds_data_dir)
      parsed = parse_gin(FLAGS.gin_file, FLAGS.gin_bindings, FLAGS.gin_search_paths)
      for unused in unused_macros(parsed, read_by_code):
        print(f"{prog}: warning: gin macro {unused} is assigned but no gin binding uses it; "
              "check its spelling", file=sys.stderr, flush=True)
      if require_complete:
        check_complete(configurable)
      main()
    except errors.UserError as e:
      pod.fail(prog, errors.one_line(e))
    except Exception as e:  # pylint: disable=broad-except
      if not pod.joined():
        raise  # a bug: its traceback
      traceback.print_exc()  # a bug on a pod: its traceback here, and every host ends now
      pod.fail(prog, f"{type(e).__name__}: {errors.one_line(e)} (a bug; see the traceback of "
               "this process)")
  app.run(wrapped, argv=argv)
