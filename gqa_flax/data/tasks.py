"""The paper's fine-tuning tasks (Ainslie et al. 2023, §3.1) as seqio Tasks.

Summarization (ROUGE): gqa_cnn_dailymail, gqa_arxiv, gqa_pubmed, gqa_mediasum,
gqa_multi_news; translation (BLEU): gqa_wmt14_ende; question answering (EM/F1):
gqa_trivia_qa. Inputs are T5-style text-to-text strings ("summarize: ...",
"translate English to German: ...", "trivia_qa question: ... context: ...").

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
      raise FileNotFoundError(
          f"TFDS dataset {name} is not prepared in {builder.data_dir_root}: "
          f"run `tfds build {name} --data_dir={builder.data_dir_root}`, or "
          "pass --tfds_data_dir "
          "(seqio.set_tfds_data_dir_override) naming a directory that has it.")

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


@seqio.map_over_dataset
def trivia_qa_question_context(example):
  """T5's 'trivia_qa question: Q context: C' -> answer, keeping all aliases.

  C joins the question's Wikipedia pages and web search results; the answer
  aliases go to 'answers' for the metric.
  """
  contexts = tf.concat([example["entity_pages"]["wiki_context"],
                        example["search_results"]["search_context"]], axis=0)
  answer = example["answer"]
  return {
      "inputs": tf.strings.join([
          "trivia_qa question: ", example["question"], " context: ",
          tf.strings.reduce_join(contexts, separator=" ")]),
      "targets": answer["value"],
      "answers": tf.concat([[answer["value"]], answer["aliases"]], axis=0),
  }


def trivia_qa_answers(answer, example=None, is_target=False):
  """seqio postprocess_fn: a target becomes the list of all its aliases."""
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
    raise FileNotFoundError(f"MediaSum directory not set: {how_to}.")
  paths = [os.path.join(directory, f) for f in MEDIASUM_FILES]
  missing = [f for f, p in zip(MEDIASUM_FILES, paths) if not os.path.isfile(p)]
  if missing:
    raise FileNotFoundError(f"MediaSum file(s) {', '.join(missing)} missing "
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
             postprocess_fn=None):
  """Registers `name`: format, tokenize, cache, append EOS after trimming."""
  seqio.TaskRegistry.add(
      name,
      source=source,
      preprocessors=[
          format_preprocessor,
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
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
           postprocess_fn=trivia_qa_answers)


register_paper_tasks()
