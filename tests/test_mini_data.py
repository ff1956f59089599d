"""The offline mini corpus: preparation, its vocabulary and its seqio tasks."""
import json
import os
import subprocess
import sys
import time
import unicodedata

import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from gqa_flax.data import mini
from gqa_flax.data import prepare
from gqa_flax.data import sources
from gqa_flax.evaluation import metrics

EOS = 1


@pytest.fixture
def prepared(mini_data_dir, monkeypatch):
  monkeypatch.setenv(mini.DATA_DIR_ENV, str(mini_data_dir))
  return mini_data_dir


def _records(corpus, split):
  return list(mini.corpus_source(corpus).get_dataset(split).as_numpy_iterator())


def _examples(task_name, lengths, split="validation"):
  task = seqio.get_mixture_or_task(task_name)
  dataset = task.get_dataset(lengths, split=split, shuffle=False, seed=0)
  return task, list(dataset.as_numpy_iterator())


def _decodes_to(vocabulary, tokens, text, max_length):
  """Whether `tokens` (ending in EOS) decode to `text`, or to its start when
  truncated to `max_length`. None when an unknown piece makes it lossy."""
  if 2 in tokens:  # <unk>
    return None
  decoded = vocabulary.decode(tokens[:-1].tolist())
  text = unicodedata.normalize("NFKC", text.decode("utf-8"))
  return text.startswith(decoded) if len(tokens) == max_length else (
      decoded == text)


def _assert_all_decode(vocabulary, examples, texts, feature, max_length):
  checked = [
      _decodes_to(vocabulary, e[feature], t, max_length)
      for e, t in zip(examples, texts)
  ]
  assert all(c in (True, None) for c in checked)
  assert checked.count(True) >= len(checked) / 2


def test_manifest_counts_match_files_and_splits_are_disjoint(prepared):
  manifest = mini.read_manifest(prepared)
  for corpus, features in mini.CORPORA.items():
    keys = {}
    for split in mini.SPLITS:
      records = _records(corpus, split)
      assert len(records) == manifest["counts"][corpus][split] > 0
      assert set(records[0]) == set(features)
      keys[split] = {r[features[0]] for r in records}
      assert all(prepare.split_of(k.decode()) == split for k in keys[split])
    assert not keys["train"] & (keys["validation"] | keys["test"])
  # Every held-out title pair's abstract is held out of pre-training too.
  held_out = {r["abstract"] for r in _records("title", "test")}
  pretrain_test = {r["text"] for r in _records("pretrain", "test")}
  assert held_out <= pretrain_test


def test_vocabulary_is_t5_style(prepared):
  model = spm.SentencePieceProcessor(
      model_file=str(mini.vocabulary_file(prepared)))
  assert (model.pad_id(), model.eos_id(), model.unk_id(), model.bos_id()) == (
      0, 1, 2, -1)
  assert model.get_piece_size() == mini.read_manifest(prepared)["vocab_size"]
  options = mini.read_manifest(prepared)["options"]
  assert model.get_piece_size() <= options["vocab_size"]
  # NFKC: the full-width "Ａ" and the ligature "ﬁ" read as "A" and "fi".
  assert model.decode(model.encode("Ａ ﬁsh")) == "A fish"
  vocabulary = seqio.get_mixture_or_task("gqa_mini_title").output_features[
      "targets"].vocabulary
  assert vocabulary.vocab_size == model.get_piece_size() + 100


def test_span_corruption_task_reconstructs_the_pretraining_text(prepared):
  task, examples = _examples("gqa_mini_span_corruption",
                             mini.SPAN_CORRUPTION_LENGTHS)
  vocabulary = task.output_features["targets"].vocabulary
  first_sentinel = vocabulary.vocab_size - 1
  reconstructed = []
  for example in examples:
    inputs, targets = example["inputs"].tolist(), example["targets"].tolist()
    assert inputs[-1] == EOS and targets[-1] == EOS
    assert len(inputs) <= 128 and len(targets) <= 32
    spans = {}
    for token in targets[:-1]:
      if token > first_sentinel - 100:
        current = spans.setdefault(token, [])
      else:
        current.append(token)
    for token in inputs[:-1]:
      reconstructed.extend(spans.pop(token) if token in spans else [token])
    assert not spans  # Each target span had its sentinel in the inputs.
  documents = _records("pretrain", "validation")
  expected = [
      t for d in documents
      for t in vocabulary.encode_tf(tf.constant(d["text"])).numpy().tolist()]
  assert reconstructed == expected


@pytest.mark.parametrize("task_name, lengths, corpus, inputs_of, targets_of, metric", [
    ("gqa_mini_title", mini.TITLE_LENGTHS, "title", lambda r: r["abstract"],
     lambda r: r["title"], metrics.rouge),
    ("gqa_mini_ende", mini.ENDE_LENGTHS, "ende",
     lambda r: b"translate English to German: " + r["en"], lambda r: r["de"],
     metrics.bleu),
])
def test_text_to_text_task(prepared, task_name, lengths, corpus, inputs_of,
                           targets_of, metric):
  task, examples = _examples(task_name, lengths)
  records = _records(corpus, "validation")
  inputs, targets = map(list, zip(*[(inputs_of(r), targets_of(r))
                                    for r in records]))
  assert [e["inputs_pretokenized"] for e in examples] == inputs
  assert [e["targets_pretokenized"] for e in examples] == targets
  vocabulary = task.output_features["targets"].vocabulary
  for feature, texts in (("inputs", inputs), ("targets", targets)):
    assert all(e[feature][-1] == EOS for e in examples)
    assert all(len(e[feature]) <= lengths[feature] for e in examples)
    _assert_all_decode(vocabulary, examples, texts, feature, lengths[feature])
  assert task.metric_fns == [metric]


def test_prepare_cli_reuses_a_prepared_corpus(prepared):
  manifest_file = mini.mini_dir(prepared) / mini.MANIFEST
  before = manifest_file.stat().st_mtime_ns
  options = mini.read_manifest(prepared)["options"]
  start = time.time()
  result = subprocess.run(
      [sys.executable, "-m", "gqa_flax.data.prepare", "--mini",
       f"--data_dir={prepared}",
       f"--max_examples={options['max_examples']}",
       f"--vocab_size={options['vocab_size']}"],
      capture_output=True, text=True, check=True,
      env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  assert "Reusing the mini corpus" in result.stdout
  assert manifest_file.stat().st_mtime_ns == before
  assert time.time() - start < 60  # Only the interpreter start-up.
  assert json.loads(manifest_file.read_text()) == mini.read_manifest(prepared)


def test_unprepared_data_dir_names_the_prepare_command(tmp_path, monkeypatch):
  monkeypatch.setenv(mini.DATA_DIR_ENV, str(tmp_path))
  command = f"python -m gqa_flax.data.prepare --mini --data_dir {tmp_path}"
  task = seqio.get_mixture_or_task("gqa_mini_ende")
  with pytest.raises(mini.NotPreparedError, match="manifest.json is missing"):
    task.get_dataset(mini.ENDE_LENGTHS, split="validation")
  with pytest.raises(mini.NotPreparedError) as error:
    _ = mini.MiniVocabulary().vocab_size
  assert command in str(error.value)


def test_wiki_markup_to_text():
  markup = ("{{Infobox|name=x}}'''Anarchism''' is a [[political philosophy]] "
            "that rejects [[State (polity)|states]]<ref>Smith 2001</ref> and "
            "all involuntary, coercive forms of hierarchy in every one of "
            "its many forms.\n== History ==\n[[File:A.jpg|thumb|A]]\n* a list")
  assert prepare.wiki_to_text(markup) == (
      "Anarchism is a political philosophy that rejects states and all "
      "involuntary, coercive forms of hierarchy in every one of its many "
      "forms.")


def test_split_of_is_a_stable_hash():
  splits = [prepare.split_of(f"example {i}") for i in range(2000)]
  assert splits == [prepare.split_of(f"example {i}") for i in range(2000)]
  assert 0.03 < splits.count("test") / 2000 < 0.07
  assert 0.03 < splits.count("validation") / 2000 < 0.07


def test_missing_registry_package_is_a_clear_error(tmp_path, monkeypatch):
  monkeypatch.setenv(sources.CACHE_ENV, str(tmp_path))
  with pytest.raises(sources.SourceError, match="gensim==0.0.0.0"):
    sources.fetch_pypi("gensim", "0.0.0.0")
  assert not (tmp_path / "pypi" / "gensim-0.0.0.0").exists()
