"""T5's SentencePiece vocabulary (32000 pieces + 100 sentinels) for all tasks.

Its file is looked up when the vocabulary is first used, not when a task is
registered, so registering tasks never needs the file. The path comes from, in
order: gin (`vocabulary_path.path = "..."`), the flag `--gqa_vocab_path`, the
environment variable `GQA_VOCAB_PATH`, else T5's public
`gs://t5-data/vocabs/cc_all.32000/sentencepiece.model` (the mini tasks: the
prepared mini vocabulary).
"""
import os

from absl import flags
import gin
import seqio
import tensorflow as tf

from gqa_flax import errors

DEFAULT_VOCAB_PATH = "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"
EXTRA_IDS = 100
VOCAB_PATH_ENV = "GQA_VOCAB_PATH"

_VOCAB_PATH_FLAG = flags.DEFINE_string(
    "gqa_vocab_path", None,
    f"SentencePiece model of the T5 vocabulary (default: ${VOCAB_PATH_ENV} or "
    f"{DEFAULT_VOCAB_PATH}).")

_HOW_TO_SET = (f"set it with --gin.vocabulary_path.path=\"'/path/sentencepiece.model'\", "
               f"the flag --gqa_vocab_path=/path/sentencepiece.model or the environment "
               f"variable {VOCAB_PATH_ENV}")


@gin.configurable
def vocabulary_path(path=None):
  """The SentencePiece model file a user set: gin `path`, the flag, the environment, or None."""
  if path:
    return path
  flag_value = flags.FLAGS[_VOCAB_PATH_FLAG.name].value  # None until parsed.
  return flag_value or os.environ.get(VOCAB_PATH_ENV) or None


class LazyPathVocabulary(seqio.SentencePieceVocabulary):
  """A SentencePieceVocabulary whose file is found and checked on first use."""

  def __init__(self, path=None, extra_ids=EXTRA_IDS):
    super().__init__(path, extra_ids=extra_ids)

  @property
  def sentencepiece_model_file(self):
    return self._sentencepiece_model_file or vocabulary_path() or DEFAULT_VOCAB_PATH

  def check_found(self) -> str:
    """The model file's path; a file that is not there, or a remote one that cannot be
    reached (gs:// without network or credentials), raises the one-line MissingPathError
    (call it before a dataset is built: inside tf.data the error would come wrapped in
    TensorFlow's traceback)."""
    path = self.sentencepiece_model_file
    try:
      found = tf.io.gfile.exists(path) if "://" in path else os.path.isfile(path)
    except tf.errors.OpError as e:
      raise _unreadable(path, e) from None
    if not found:
      raise errors.MissingPathError(
          f"SentencePiece vocabulary not found at {path}; {_HOW_TO_SET}.")
    return path

  def _model_context(self):
    if self._model is None:
      path = self.check_found()
      self._sentencepiece_model_file = path
      try:
        return super()._model_context()
      except tf.errors.OpError as e:
        raise _unreadable(path, e) from e
    return self._model


def _unreadable(path: str, error: tf.errors.OpError) -> errors.MissingPathError:
  reason = error.message.strip().splitlines()[0]
  return errors.MissingPathError(
      f"SentencePiece vocabulary not readable at {path} ({reason}); {_HOW_TO_SET}.")


@gin.configurable
def get_vocabulary(path=None):
  """T5's vocabulary, 100 extra ids; `path` defaults to `vocabulary_path()`."""
  return LazyPathVocabulary(path)
