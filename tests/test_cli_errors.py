"""Every gqa-* command answers a user's mistake in one line and leaves nothing behind.

Each bad input runs the command as `python -m gqa_flax.<cmd> ARGS` does, and the test asserts:
exit code 1, no traceback, exactly one `gqa-<cmd>: error:` line (the last line of its output)
naming the setting or file, and the working directory exactly as it was. The gin commands'
cases are forked from one server that imported their libraries once (the reproduction's stage
fork server, which test_forkserver.py holds to `python -m`; ~6 s less per case), the
checkpoint cases run as subprocesses, and the installed console scripts run as a user's shell
runs them. The gin composition rules and the typo guard are checked in-process against the
repository's own gin files.
"""
import collections
import glob
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time

import gin
import numpy as np
import pytest

from gqa_flax.data import mini, vocab
from gqa_flax.reproduce.forkserver import ForkServer
from gqa_flax.training import gin_utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"gqa-train": "gqa_flax.train", "gqa-eval": "gqa_flax.eval",
            "gqa-infer": "gqa_flax.infer", "gqa-convert": "gqa_flax.convert",
            "gqa-reproduce": "gqa_flax.reproduce.cli"}
GIN_COMMANDS = ["gqa-train", "gqa-eval", "gqa-infer"]
T5X_TINY = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "t5x",
                        "test_t5_tiny.checkpoint_0")
TINY = ["--gin_file=experiments/tiny_pretrain.gin"]
SETTINGS_CASES = {
    "train: settings missing": (
        "gqa-train", ["--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/pretrain.gin",
                      "--gin.MODEL_DIR='{tmp}/run'"],
        "gin settings MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS not set; pass "
        "--gin.MIXTURE_OR_TASK_NAME=VALUE"),
    "train: MODEL_DIR missing": ("gqa-train", TINY, "MODEL_DIR is not set"),
    "train: unquoted string": (
        "gqa-train", TINY + ["--gin.MODEL_DIR={tmp}/run"],
        "gin: Unable to parse value (binding line 1: MODEL_DIR={tmp}/run); fix the gin syntax"),
    "train: gin file missing": (
        "gqa-train", ["--gin_file=experiments/tiny_pretrain_typo.gin"],
        "gin: Unable to open file: experiments/tiny_pretrain_typo.gin"),
    "train: unknown macro": (
        "gqa-train", TINY + ["--gin.BATCH_SZE=8"], "unknown macro BATCH_SZE in binding"),
    "train: unknown configurable": (
        "gqa-train", ["--gin_file={tmp}/typo.gin"],
        "gin: No configurable matching 'trian' (file \"{tmp}/typo.gin\", line 2"),
    "train: stray argument": (
        "gqa-train", TINY + ["--gin.MODEL_DIR='{tmp}/run'", "run2"], "unexpected arguments run2"),
    "uptrain: INITIAL_CHECKPOINT_PATH missing": (
        "gqa-train", TINY + ["--gin_file=runs/uptrain.gin", "--gin.MODEL_DIR='{tmp}/run'"],
        "gin setting INITIAL_CHECKPOINT_PATH not set; pass --gin.INITIAL_CHECKPOINT_PATH=VALUE"),
    "uptrain: INITIAL_CHECKPOINT_PATH does not exist": (
        "gqa-train", TINY + ["--gin_file=runs/uptrain.gin", "--gin.MODEL_DIR='{tmp}/run'",
                             "--gin.INITIAL_CHECKPOINT_PATH='{tmp}/nowhere'"],
        "restore path {tmp}/nowhere is not a checkpoint_<step> directory"),
    "eval: settings missing": (
        "gqa-eval", ["--gin_file=runs/eval.gin"],
        "gin settings CHECKPOINT_PATH, EVAL_OUTPUT_DIR, MIXTURE_OR_TASK_NAME, "
        "TASK_FEATURE_LENGTHS not set"),
    "eval: CHECKPOINT_PATH does not exist": (
        "gqa-eval", ["--gin_file=runs/eval.gin", "--gin_file=experiments/tasks/cnn_dailymail.gin",
                     "--gin.CHECKPOINT_PATH='{tmp}/nowhere'", "--gin.EVAL_OUTPUT_DIR='{tmp}/ev'"],
        "CHECKPOINT_PATH '{tmp}/nowhere' does not exist"),
    "infer: settings missing": (
        "gqa-infer", ["--gin_file=runs/infer.gin", "--gin_file=experiments/tasks/arxiv.gin"],
        "gin settings CHECKPOINT_PATH, INFER_OUTPUT_DIR not set"),
    "convert: groups that do not divide the heads": (
        "gqa-convert", ["--src", "{t5x_tiny}", "--dst", "{tmp}/dst", "--num_kv_heads", "5"],
        "num_kv_heads=5 must be a positive divisor of num_heads=4"),
    "convert: DST exists": (
        "gqa-convert", ["--src", "{t5x_tiny}", "--dst", "{tmp}", "--num_kv_heads", "1"],
        "DST {tmp} exists; pass --overwrite to replace it"),
    "convert: a required flag missing": (
        "gqa-convert", ["--src", "{t5x_tiny}", "--dst", "{tmp}/dst"],
        "the following arguments are required: --num_kv_heads; see gqa-convert --help"),
    "reproduce: --out missing": (
        "gqa-reproduce", ["--preset", "smoke"],
        "the following arguments are required: --out; see gqa-reproduce --help"),
    "reproduce: unknown preset": (
        "gqa-reproduce", ["--preset", "mni", "--out", "{tmp}/out"], "unknown preset 'mni'"),
    "reproduce: unknown binding": (
        "gqa-reproduce", ["--preset", "smoke", "--out", "{tmp}/out", "--gin_bindings",
                          "Preset.eval_exampels=5"], "eval_exampels"),
    "finetune: the task's TFDS dataset is not prepared": (
        "gqa-train", ["--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/finetune.gin",
                      "--gin_file=experiments/tasks/cnn_dailymail.gin",
                      "--gin.MODEL_DIR='{tmp}/run'", "--gin.TRAIN_STEPS=1",
                      "--gin.INITIAL_CHECKPOINT_PATH='{t5x_tiny}'", "--tfds_data_dir={tmp}/tfds",
                      "--gqa_vocab_path={tmp}/spm.model"],  # found: the default is on gs://
        "TFDS dataset cnn_dailymail:3.4.0 is not prepared in {tmp}/tfds"),
    "train: the vocabulary file is missing": (
        "gqa-train", ["--gin_file=models/t5_1_1/tiny.gin", "--gin_file=reproduce/mini/pretrain.gin",
                      "--gin.MODEL_DIR='{tmp}/run'", "--gin.TRAIN_STEPS=1",
                      "--gqa_vocab_path={tmp}/nowhere.model"],
        "SentencePiece vocabulary not found at {tmp}/nowhere.model; set it with"),
    "train: the vocabulary is on gs:// and cannot be reached (no network here)": (
        "gqa-train", ["--gin_file=models/t5_1_1/tiny.gin", "--gin_file=reproduce/mini/pretrain.gin",
                      "--gin.MODEL_DIR='{tmp}/run'", "--gin.TRAIN_STEPS=1",
                      "--gqa_vocab_path=gs://gqa-flax-no-such-bucket/spm.model"],
        # 'not readable at ... (could not resolve host)' here; 'not found at' with network
        "SentencePiece vocabulary not"),
    "vocabulary flag and gin binding are accepted": (
        "gqa-train", ["--gin_file=models/t5_1_1/tiny.gin", "--gin_file=runs/pretrain.gin",
                      "--gqa_vocab_path={tmp}/spm.model",
                      "--gin.vocabulary_path.path='{tmp}/spm.model'"],
        "gin settings MIXTURE_OR_TASK_NAME, TASK_FEATURE_LENGTHS, TRAIN_STEPS not set"),
}


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")


def tree(path):
  return sorted(os.path.relpath(p, path) for p in glob.glob(f"{path}/**", recursive=True))


Ran = collections.namedtuple("Ran", "returncode output")  # output: stdout and stderr together


@pytest.fixture(scope="module")
def run_command(tmp_path_factory):
  """run_command(prog, args) -> Ran: `python -m MODULE ARGS` forked from a server started in
  an empty working directory, which each command must leave empty."""
  cwd, logs = tmp_path_factory.mktemp("cwd"), tmp_path_factory.mktemp("logs")
  server = ForkServer(_env(), cwd=str(cwd))
  numbers = itertools.count()

  def run(prog, args):
    log = logs / f"{next(numbers)}.txt"
    process = server.start([COMMANDS[prog], *args], str(log))
    try:
      returncode = process.wait(timeout=300)
    finally:
      process.kill()
      process.wait()
    assert tree(cwd) == ["."], tree(cwd)
    return Ran(returncode, log.read_text())

  yield run
  server.close()


def assert_one_line_error(returncode, output, prog, expected):
  """output: stderr, or stdout and stderr together."""
  assert returncode == 1, output[-3000:]
  assert "Traceback" not in output, output[-3000:]
  assert "usage:" not in output, output[-3000:]  # argparse's block: not for errors
  lines = output.strip().splitlines()
  errors = [line for line in lines if line.startswith(f"{prog}: error:")]
  assert errors == [lines[-1]], output[-3000:]
  assert expected in lines[-1], lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SETTINGS_CASES))
def test_bad_settings_end_in_one_line_with_nothing_written(case, run_command, tmp_path):
  prog, args, expected = SETTINGS_CASES[case]
  (tmp_path / "typo.gin").write_text(
      "include 'experiments/tiny_pretrain.gin'\ntrian.eval_steps = 2\n")
  (tmp_path / "spm.model").write_bytes(b"")  # a vocabulary file that exists (never read)
  before = tree(tmp_path)
  result = run_command(prog, [a.format(tmp=tmp_path, t5x_tiny=T5X_TINY) for a in args])
  assert_one_line_error(*result, prog, expected.format(tmp=tmp_path))
  assert tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("prog", GIN_COMMANDS)
def test_help_lists_the_gin_flags_and_exits_0(prog, run_command):
  result = run_command(prog, ["--help"])
  assert result.returncode == 0, result.output[-2000:]
  for text in (f"usage: {prog} --gin_file=FILE", "--gin_file:", "--gin.NAME=VALUE",
               "--gin_search_paths:", "--tfds_data_dir:", "--[no]multiprocess_gpu:",
               "--gqa_vocab_path:", "Needs "):
    assert text in result.output, (text, result.output)
  assert len(result.output.splitlines()) < 100


@pytest.fixture
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


def test_run_files_compose_with_an_experiment_or_a_task_file(clean_gin):
  gin_utils.parse_gin(["experiments/tiny_pretrain.gin", "runs/uptrain.gin"], [])
  # uptrain.gin includes runs/pretrain.gin again: read once, the experiment's values stay.
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "gqa_mini_span_corruption"
  assert gin.query_parameter("%BATCH_SIZE") == 16
  assert gin_utils.missing_settings() == ["INITIAL_CHECKPOINT_PATH"]
  gin.clear_config()
  gin_utils.parse_gin(["models/t5_1_1/tiny.gin", "experiments/tasks/cnn_dailymail.gin",
                       "runs/finetune.gin"], [])
  # finetune.gin's `MIXTURE_OR_TASK_NAME = %gin.REQUIRED` does not undo the task file's.
  assert gin.query_parameter("%MIXTURE_OR_TASK_NAME") == "gqa_cnn_dailymail"
  assert gin.query_parameter("%BEST_METRIC") == "rouge1"
  assert gin_utils.missing_settings() == ["INITIAL_CHECKPOINT_PATH", "TRAIN_STEPS"]
  gin.clear_config()
  gin_utils.parse_gin(["runs/finetune.gin"], ["INITIAL_CHECKPOINT_PATH = '/ckpt'"])
  assert gin_utils.missing_settings() == ["BEST_METRIC", "MIXTURE_OR_TASK_NAME",
                                          "TASK_FEATURE_LENGTHS", "TRAIN_STEPS"]


def test_a_macro_no_binding_uses_is_named_with_its_file(clean_gin, tmp_path):
  typo = tmp_path / "typo.gin"
  typo.write_text("include 'experiments/tiny_pretrain.gin'\nBATCH_SZE = 8\n")
  parsed = gin_utils.parse_gin([str(typo)], [])
  assert gin_utils.unused_macros(parsed) == [f"BATCH_SZE ({typo})"]


@pytest.mark.parametrize("experiment", sorted(
    os.path.relpath(p, gin_utils.CONFIGS_DIR)
    for p in glob.glob(os.path.join(gin_utils.CONFIGS_DIR, "experiments", "*.gin"))))
def test_the_repository_experiments_have_no_unused_macro(experiment, clean_gin):
  parsed = gin_utils.parse_gin([experiment], [])
  assert gin_utils.unused_macros(parsed) == []


def test_the_mini_tasks_take_the_vocabulary_the_user_set(monkeypatch, tmp_path):
  monkeypatch.setenv(vocab.VOCAB_PATH_ENV, str(tmp_path / "spm.model"))
  assert mini.MiniVocabulary().sentencepiece_model_file == str(tmp_path / "spm.model")
  assert vocab.get_vocabulary().sentencepiece_model_file == str(tmp_path / "spm.model")



@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """One small checkpoint of each format, from the real T5X fixture (HF: transformers)."""
  # pylint: disable-next=import-outside-toplevel
  from gqa_flax.checkpoints import convert, reader, t5x_legacy
  root = tmp_path_factory.mktemp("formats")
  source = reader.open_checkpoint(T5X_TINY)
  t5x_legacy.write_t5x_legacy(str(root / "legacy"), source.arrays, 0, inline_max_bytes=1024)
  convert.convert_checkpoint(T5X_TINY, str(root / "orbax"), source.config.num_heads,
                             progress=False)
  transformers = pytest.importorskip("transformers")
  config = transformers.T5Config(vocab_size=64, d_model=8, d_kv=3, d_ff=16, num_layers=2,
                                 num_heads=4, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False)
  transformers.T5ForConditionalGeneration(config).save_pretrained(root / "hf",
                                                                 safe_serialization=True)
  return root


def _truncate(path):
  data = open(path, "rb").read()
  os.chmod(path, 0o644)
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _largest(pattern):
  return max((p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)),
             key=os.path.getsize)


# name: (format copied, the file damaged (glob), how, what the error line names)
CORRUPT_CASES = {
    "T5X msgpack file truncated": ("msgpack", "", _truncate, "{src}: cannot be read"),
    "T5X legacy msgpack truncated": ("legacy", "checkpoint", _truncate,
                                     "{src}/checkpoint: cannot be read"),
    "T5X legacy zarr chunk truncated": (
        "legacy", "target.decoder.logits_dense.kernel/0.0", _truncate,
        "{src}/target.decoder.logits_dense.kernel: cannot be read"),
    "T5X legacy zarr array missing": (
        "legacy", "target.decoder.logits_dense.kernel", shutil.rmtree,
        "TensorStore array directory {src}/target.decoder.logits_dense.kernel is missing"),
    "HF safetensors truncated": ("hf", "model.safetensors", _truncate,
                                 "{src}/model.safetensors: truncated"),
    "HF config.json truncated": ("hf", "config.json", _truncate,
                                 "{src}/config.json: cannot be read"),
    "Orbax OCDBT data truncated": ("orbax", "**/ocdbt.process_0/d/*", _truncate,
                                   "{src}/checkpoint_0"),
    "Orbax metadata truncated": ("orbax", "checkpoint_0/state/_METADATA", _truncate,
                                 "{src}/checkpoint_0/state/_METADATA: cannot be read"),
    "Orbax config truncated": ("orbax", "checkpoint_0/config/*", _truncate,
                               "{src}/checkpoint_0/config: cannot be read"),
    "path does not exist": ("none", None, None, "checkpoint {src} does not exist"),
}


def _damaged_copy(checkpoints, case, directory):
  kind, damaged, damage, _ = CORRUPT_CASES[case]
  directory.mkdir()
  src = str(directory / kind)
  if kind == "msgpack":
    shutil.copy(T5X_TINY, src)
  elif kind != "none":
    shutil.copytree(checkpoints / kind, src)
  if damage is not None:
    damage(_largest(os.path.join(src, damaged)) if damaged and "*" in damaged
           else os.path.join(src, damaged) if damaged else src)
  return src


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CORRUPT_CASES))
def test_convert_names_the_damaged_file_and_writes_nothing(case, checkpoints, tmp_path):
  src = _damaged_copy(checkpoints, case, tmp_path / "src")
  work = tmp_path / "work"
  work.mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "gqa_flax.convert", "--src", src, "--dst", str(work / "dst"),
       "--num_kv_heads", "1"], cwd=work, env=_env(), capture_output=True, text=True,
      timeout=300, check=False)
  assert_one_line_error(result.returncode, result.stderr, "gqa-convert",
                        CORRUPT_CASES[case][3].format(src=src))
  assert os.listdir(work) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", ["T5X legacy zarr chunk truncated", "Orbax OCDBT data truncated"])
def test_eval_names_the_damaged_file_and_writes_nothing(case, checkpoints, run_command,
                                                       tmp_path):
  src = _damaged_copy(checkpoints, case, tmp_path / "src")
  work = tmp_path / "work"
  work.mkdir()
  result = run_command("gqa-eval", [
      "--gin_file=runs/eval.gin", "--gin_file=experiments/tasks/cnn_dailymail.gin",
      f"--gin.CHECKPOINT_PATH='{src}'", f"--gin.EVAL_OUTPUT_DIR='{work}/eval'"])
  assert_one_line_error(*result, "gqa-eval", CORRUPT_CASES[case][3].format(src=src))
  assert os.listdir(work) == []


def _stop_while_writing(command, work, signum):
  """Runs gqa-convert and sends it `signum` once its temporary DST appears."""
  with subprocess.Popen(command, cwd=work, env=_env(), stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True) as writer:
    try:
      deadline = time.time() + 240
      while (not glob.glob(f"{work}/dst.tmp-*") and writer.poll() is None
             and time.time() < deadline):
        time.sleep(0.01)
      writer.send_signal(signum)
      stdout, stderr = writer.communicate(timeout=120)
    finally:
      writer.kill()
  return subprocess.CompletedProcess(command, writer.returncode, stdout, stderr)


@pytest.mark.slow
def test_a_conversion_stopped_while_writing_leaves_only_what_it_finished(tmp_path):
  """SIGTERM: one line and nothing left. SIGKILL: the writer's DST.tmp-<host>-<pid> is left;
  the rerun removes it and writes DST, equal array for array to an uninterrupted conversion."""
  from gqa_flax.checkpoints import convert, reader  # pylint: disable=import-outside-toplevel
  transformers = pytest.importorskip("transformers")
  config = transformers.T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024,
                                 num_layers=1, num_heads=8, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False)  # 130 MB: a write that takes a while
  src = tmp_path / "hf"
  transformers.T5ForConditionalGeneration(config).save_pretrained(src, safe_serialization=True)
  work = tmp_path / "work"
  work.mkdir()
  command = [sys.executable, "-m", "gqa_flax.convert", "--src", str(src), "--dst",
             str(work / "dst"), "--num_kv_heads", "2"]
  stopped = _stop_while_writing(command, work, signal.SIGTERM)
  assert_one_line_error(stopped.returncode, stopped.stderr, "gqa-convert",
                        "interrupted (SIGTERM); ")
  deadline = time.time() + 30  # removed once the stopped process has ended
  while os.listdir(work) and time.time() < deadline:
    time.sleep(0.1)
  assert os.listdir(work) == []  # SIGTERM: cleaned up like Ctrl-C
  _stop_while_writing(command, work, signal.SIGKILL)
  left = os.listdir(work)
  assert len(left) == 1 and left[0].startswith("dst.tmp-"), left  # killed while writing
  rerun = subprocess.run(command, cwd=work, env=_env(), capture_output=True, text=True,
                         timeout=300, check=False)
  assert rerun.returncode == 0, rerun.stderr[-2000:]
  assert os.listdir(work) == ["dst"]
  convert.convert_checkpoint(str(src), str(tmp_path / "reference"), 2, progress=False)
  got, want = reader.open_checkpoint(str(work / "dst")), reader.open_checkpoint(
      str(tmp_path / "reference"))
  assert got.config == want.config and sorted(got.arrays) == sorted(want.arrays)
  for name, array in want.arrays.items():
    np.testing.assert_array_equal(got.arrays[name].read(), array.read(), err_msg=name)


def _run_installed(prog, args, unset, cwd=None):
  """The installed console script `prog` with the suite's environment less the variables
  `unset` (what a user's shell may lack); skipped where an accelerator is attached."""
  from gqa_flax import console  # pylint: disable=import-outside-toplevel
  # pylint: disable-next=protected-access
  if console._attached(console._TPU_DEVICES + console._GPU_DEVICES):
    pytest.skip("an accelerator is attached")
  script = os.path.join(os.path.dirname(sys.executable), prog)
  env = {k: v for k, v in _env().items() if k not in unset}
  return subprocess.run([script, *args], env=env, cwd=cwd, capture_output=True, text=True,
                        timeout=300, check=False)


@pytest.mark.slow
def test_the_installed_script_picks_the_cpu_without_libtpu_lines(tmp_path):
  """With JAX_PLATFORMS unset on a machine without an accelerator, the console script itself
  chooses the CPU backend: an installed libtpu prints nothing."""
  result = _run_installed("gqa-convert", ["--src", T5X_TINY, "--dst", str(tmp_path / "mqa"),
                                          "--num_kv_heads", "1"], unset=["JAX_PLATFORMS"])
  assert result.returncode == 0, result.stderr[-2000:]
  assert "TPU" not in result.stderr and "libtpu" not in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("prog,missing", [("gqa-train", "train.model"),
                                          ("gqa-eval", "evaluate.dataset_cfg")])
def test_the_installed_script_without_a_run_file_says_so_in_one_line(prog, missing):
  """A model gin file alone: one line naming what is not set and the fix; nothing from
  TensorFlow's GPU support (cudart stub, cuInit) on a machine without a GPU, at the default
  log level."""
  result = _run_installed(prog, ["--gin_file=models/t5_1_1/tiny.gin"],
                          unset=["JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL"], cwd=ROOT)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: gin: {missing}") and \
      "configs/runs/" in lines[0], result.stderr[-2000:]
