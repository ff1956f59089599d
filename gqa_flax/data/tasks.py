"""The paper's fine-tuning tasks (Ainslie et al. 2023, §3.1) as seqio Tasks.

Summarization (ROUGE): gqa_cnn_dailymail, gqa_arxiv, gqa_pubmed, gqa_mediasum,
gqa_multi_news; translation (BLEU): gqa_wmt14_ende; question answering (EM/F1):
gqa_trivia_qa. Where T5 (`t5.data.tasks`) defines the task (CNN/Daily Mail
`cnn_dailymail_v002`, WMT14 `wmt14_ende_v003`, TriviaQA `trivia_qa_v010`) ours
gives the same examples: "summarize: ARTICLE", "translate English to German:
EN", T5's TriviaQA "question: Q context: C" -> alias (one example per context
and alias found in it, long inputs cut around the answer). The other
summarization tasks follow T5's `summarize` format.

TFDS datasets are read, never downloaded: prepare them with
`tfds build NAME:VERSION --data_dir=DIR` and pass DIR as --tfds_data_dir
(seqio.set_tfds_data_dir_override). MediaSum is read from its official JSON
files (its TFDS builder needs Apache Beam) in the directory named by gin
`mediasum_dir.path` or $GQA_MEDIASUM_DIR.
"""
import functools
import json
import os

import gin
import seqio
import tensorflow as tf

from gqa_flax import errors
from gqa_flax.data import vocab
from gqa_flax.evaluation import metrics

# Input/target lengths of §3.1; fine-tuning configs bind TASK_FEATURE_LENGTHS
# from the same numbers.
PAPER_FEATURE_LENGTHS = {
    "gqa_cnn_dailymail": {"inputs": 512, "targets": 256},
    "gqa_arxiv": {"inputs": 2048, "targets": 512},
    "gqa_pubmed": {"inputs": 2048, "targets": 512},
    "gqa_mediasum": {"inputs": 2048, "targets": 512},
    "gqa_multi_news": {"inputs": 2048, "targets": 512},
    "gqa_wmt14_ende": {"inputs": 512, "targets": 256},
    "gqa_trivia_qa": {"inputs": 2048, "targets": 32},
}

# (task name, TFDS name, document feature, summary feature).
TFDS_SUMMARIZATION_TASKS = (
    ("gqa_cnn_dailymail", "cnn_dailymail:3.4.0", "article", "highlights"),
    ("gqa_arxiv", "scientific_papers/arxiv:1.1.1", "article", "abstract"),
    ("gqa_pubmed", "scientific_papers/pubmed:1.1.1", "article", "abstract"),
    ("gqa_multi_news", "multi_news:2.1.0", "document", "summary"),
)
WMT14_ENDE_TFDS = "wmt14_translate/de-en:1.0.0"
TRIVIA_QA_TFDS = "trivia_qa/rc:1.1.0"

MEDIASUM_DIR_ENV = "GQA_MEDIASUM_DIR"
MEDIASUM_FILES = ("news_dialogue.json", "train_val_test_split.json")
# seqio split -> key of train_val_test_split.json.
MEDIASUM_SPLITS = {"train": "train", "validation": "val", "test": "test"}


class PreparedTfdsDataSource(seqio.TfdsDataSource):
  """A read-only TfdsDataSource that says how to prepare a missing dataset."""

  def __init__(self, tfds_name):
    super().__init__(tfds_name, read_only=True)

  def _check_prepared(self):
    builder = self.tfds_dataset.builder
    if not builder.is_prepared():
      name = self.tfds_dataset.name
      raise errors.MissingPathError(
          f"TFDS dataset {name} is not prepared in {builder.data_dir_root}: "
          f"run `tfds build {name} --data_dir={builder.data_dir_root}`, or "
          "pass --tfds_data_dir "
          "(seqio.set_tfds_data_dir_override) naming a directory that has it.")

  @property
  def splits(self):
    self._check_prepared()  # seqio's Evaluator asks first; unprepared, TFDS lists none
    return super().splits

  def get_dataset(self, split, *args, **kwargs):
    self._check_prepared()
    return super().get_dataset(split, *args, **kwargs)

  def list_shards(self, split):
    self._check_prepared()
    return super().list_shards(split)

  def num_input_examples(self, split):
    self._check_prepared()
    return super().num_input_examples(split)


@seqio.map_over_dataset
def text_to_text(example, prefix, input_key, target_key):
  """{'inputs': prefix + example[input_key], 'targets': example[target_key]}."""
  return {"inputs": tf.strings.join([prefix, example[input_key]]),
          "targets": example[target_key]}


def squash_spaces(text):
  """Each run of whitespace becomes one space; `text`: strings of any shape."""
  return tf.strings.regex_replace(text, r"\s+", " ")


def pad_punctuation(text):
  """Spaces around every ASCII punctuation character, whitespace squashed.

  T5's TriviaQA text normalization; `text`: strings of any shape.
  """
  return squash_spaces(
      tf.strings.regex_replace(text, r"([[:punct:]])", r" \1 "))


def trivia_qa_question_context(dataset):
  """T5's TriviaQA examples: one per context and answer alias found in it.

  Each of a question's contexts (its Wikipedia pages, then its web search
  results) is paired with each of its normalized answer aliases, and the pairs
  whose context contains the alias (lower case, punctuation padded) become
  examples, contexts first:
    inputs   'question: Q context: C'  (Q and C punctuation padded)
    targets  the alias, punctuation padded
    answers  all the question's aliases, for the metric
  A question with no alias in any context gives no example.
  """

  def examples(x):
    contexts = pad_punctuation(tf.concat(
        [x["entity_pages"]["wiki_context"],
         x["search_results"]["search_context"]], axis=0))  # [C]
    aliases = pad_punctuation(x["answer"]["normalized_aliases"])  # [A]
    inputs = squash_spaces(tf.strings.join(
        ["question:", pad_punctuation(x["question"]), "context:", contexts],
        separator=" "))  # [C]
    # (context, alias) index pairs, contexts first: [C * A, 2].
    pairs = tf.reshape(tf.stack(tf.meshgrid(
        tf.range(tf.size(contexts)), tf.range(tf.size(aliases)),
        indexing="ij"), axis=-1), [-1, 2])
    lower_contexts = tf.strings.lower(contexts)
    found = tf.map_fn(
        lambda pair: tf.strings.regex_full_match(
            lower_contexts[pair[0]], tf.strings.lower(
                tf.strings.join([".*", aliases[pair[1]], ".*"]))),
        pairs, fn_output_signature=tf.bool)  # [C * A]
    pairs = tf.boolean_mask(pairs, found)
    answer = x["answer"]
    all_aliases = tf.concat([[answer["value"]], answer["aliases"]], axis=0)
    return {
        "inputs": tf.gather(inputs, pairs[:, 0]),
        "targets": tf.gather(aliases, pairs[:, 1]),
        "answers": tf.tile(all_aliases[None, :], [tf.shape(pairs)[0], 1]),
    }

  return dataset.map(examples, num_parallel_calls=tf.data.AUTOTUNE).unbatch()


def answer_starts(tokens, answer):
  """int64 [K]: every position where `answer` occurs in `tokens` (both 1-D)."""
  num_starts = tf.maximum(tf.size(tokens) - tf.size(answer) + 1, 0)
  windows = tf.gather(tokens, tf.range(num_starts)[:, None] +
                      tf.range(tf.size(answer))[None, :])
  return tf.where(tf.reduce_all(windows == answer[None, :], axis=1))[:, 0]


def trivia_qa_truncate_inputs(dataset, sequence_length):
  """T5's cut of long TriviaQA inputs to a random window holding the answer.

  Inputs longer than sequence_length['inputs'] become a window of that many
  tokens, drawn uniformly (one seed per example) among those that hold the
  answer's first occurrence; examples whose answer tokens are not in their
  inputs are dropped.
  """
  length = sequence_length["inputs"]

  def window_with_answer(inputs, answer, seed):
    starts = answer_starts(inputs, answer)

    def window():
      first = tf.cast(starts[0], tf.int32)
      start = tf.random.stateless_uniform(
          [], minval=tf.maximum(0, first - (length - tf.size(answer))),
          maxval=tf.minimum(first, tf.size(inputs) - length) + 1,
          dtype=tf.int32, seed=seed)
      return inputs[start:start + length]

    return tf.cond(tf.size(starts) > 0, window, lambda: inputs[:0])

  @seqio.map_over_dataset(num_seeds=1)
  def truncate(x, seed):
    inputs = tf.cond(
        tf.size(x["inputs"]) > length,
        lambda: window_with_answer(x["inputs"], x["targets"], seed),
        lambda: x["inputs"])
    return {**x, "inputs": inputs}

  return truncate(dataset).filter(lambda x: tf.size(x["inputs"]) > 0)


def trivia_qa_answers(answer, example=None, is_target=False):
  """seqio postprocess_fn: a target becomes the list of all its aliases.

  T5's `postprocessors.qa`, as its QA tasks that score against every answer
  use it.
  """
  if is_target:
    return [tf.compat.as_text(a) for a in example["answers"]]
  return answer


@gin.configurable
def mediasum_dir(path=None):
  """MediaSum's JSON files' directory: gin `path`, else the environment."""
  return path or os.environ.get(MEDIASUM_DIR_ENV)


def mediasum_files():
  """Paths of news_dialogue.json and train_val_test_split.json; checked."""
  directory = mediasum_dir()
  how_to = (f"download {' and '.join(MEDIASUM_FILES)} from "
            "https://github.com/zcgzcgzcg1/MediaSum into a directory and name "
            f"it with ${MEDIASUM_DIR_ENV} or gin "
            "`gqa_flax.data.tasks.mediasum_dir.path`")
  if not directory:
    raise errors.MissingPathError(f"MediaSum directory not set: {how_to}.")
  paths = [os.path.join(directory, f) for f in MEDIASUM_FILES]
  missing = [f for f, p in zip(MEDIASUM_FILES, paths) if not os.path.isfile(p)]
  if missing:
    raise errors.MissingPathError(f"MediaSum file(s) {', '.join(missing)} missing "
                                  f"in {directory}: {how_to}.")
  return paths


def mediasum_dialogue_text(dialogue):
  """'SPEAKER: utterance' turns joined by spaces."""
  return " ".join(f"{speaker}: {utterance}" for speaker, utterance in zip(
      dialogue["speaker"], dialogue["utt"]))


def mediasum_dataset(split, shuffle_files=False, seed=None):
  """MediaSum interviews of `split` as {'id', 'dialogue', 'summary'} strings."""
  dialogues_path, splits_path = mediasum_files()
  with open(splits_path) as f:
    split_ids = set(json.load(f)[MEDIASUM_SPLITS[split]])
  with open(dialogues_path) as f:
    dialogues = [d for d in json.load(f) if d["id"] in split_ids]

  def examples():  # A generator: MediaSum's train split exceeds 1 GB of text.
    for d in dialogues:
      yield {"id": d["id"], "dialogue": mediasum_dialogue_text(d),
             "summary": d["summary"]}

  dataset = tf.data.Dataset.from_generator(examples, output_signature={
      key: tf.TensorSpec((), tf.string) for key in ("id", "dialogue", "summary")
  })
  if shuffle_files:
    dataset = dataset.shuffle(max(len(dialogues), 1), seed=seed)
  return dataset


def output_features():
  """inputs/targets in T5's vocabulary, each ending in EOS."""
  vocabulary = vocab.get_vocabulary()
  return {
      "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
      "targets": seqio.Feature(vocabulary, add_eos=True),
  }


def add_task(name, source, format_preprocessor, metric_fn,
             postprocess_fn=None, token_preprocessors=()):
  """Registers `name`: format, tokenize, cache, [token_preprocessors], EOS.

  EOS is appended after trimming to the feature lengths.
  """
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          format_preprocessor,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          *token_preprocessors,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features=output_features(),
      postprocess_fn=postprocess_fn,
      metric_fns=[metric_fn])


def summarize(input_key, target_key):
  return functools.partial(text_to_text, prefix="summarize: ",
                           input_key=input_key, target_key=target_key)


def register_paper_tasks():
  """Registers the paper's seven tasks, replacing earlier registrations."""
  for name in PAPER_FEATURE_LENGTHS:
    seqio.TaskRegistry.remove(name)
  for name, tfds_name, input_key, target_key in TFDS_SUMMARIZATION_TASKS:
    add_task(name, PreparedTfdsDataSource(tfds_name),
             summarize(input_key, target_key), metrics.rouge)
  add_task("gqa_mediasum",
           seqio.FunctionDataSource(mediasum_dataset,
                                    splits=tuple(MEDIASUM_SPLITS)),
           summarize("dialogue", "summary"), metrics.rouge)
  add_task("gqa_wmt14_ende", PreparedTfdsDataSource(WMT14_ENDE_TFDS),
           functools.partial(text_to_text,
                             prefix="translate English to German: ",
                             input_key="en", target_key="de"),
           metrics.bleu)
  add_task("gqa_trivia_qa", PreparedTfdsDataSource(TRIVIA_QA_TFDS),
           trivia_qa_question_context, metrics.trivia_qa,
           postprocess_fn=trivia_qa_answers,
           token_preprocessors=[trivia_qa_truncate_inputs])


register_paper_tasks()
