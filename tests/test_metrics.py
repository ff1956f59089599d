"""T5's metrics against values counted by hand and against the `t5` package."""
import collections
import json
import math
import re
import tarfile

import numpy as np
import pytest
import sacrebleu

from gqa_flax.data import mini
from gqa_flax.data import sources
from gqa_flax.evaluation import metrics


def test_rouge_on_a_prefix_counts_unigram_and_bigram_overlap():
  # Target: the cat sat on the mat (6 unigrams, 5 bigrams); prediction: the
  # cat sat (3 unigrams, 2 bigrams), all of which occur in the target.
  scores = metrics.rouge(["the cat sat on the mat"], ["the cat sat"])
  # rouge1: P = 3/3, R = 3/6 -> F = 2/3. rouge2: P = 2/2, R = 2/5 -> F = 4/7.
  # rougeLsum: LCS 'the cat sat' = 3 tokens -> same as rouge1.
  assert scores["rouge1"] == pytest.approx(100 * 2 / 3)
  assert scores["rouge2"] == pytest.approx(100 * 4 / 7)
  assert scores["rougeLsum"] == pytest.approx(100 * 2 / 3)


def test_rouge_lsum_splits_sentences_at_space_period_space():
  # As one sentence the LCS of 'oil rose gas fell' and 'gas fell oil rose' is
  # 2 of 4 tokens (F = 50); split at ' . ' each target sentence is matched by
  # a predicted one, so the summary-level LCS is 4 of 4.
  scores = metrics.rouge(["oil rose . gas fell"], ["gas fell . oil rose"])
  assert scores["rouge1"] == pytest.approx(100)
  # Bigrams 'oil rose', 'rose gas', 'gas fell' vs 'gas fell', 'fell oil',
  # 'oil rose': 2 of 3 shared.
  assert scores["rouge2"] == pytest.approx(100 * 2 / 3)
  assert scores["rougeLsum"] == pytest.approx(100)
  unsplit = metrics.rouge(["oil rose gas fell"], ["gas fell oil rose"])
  assert unsplit["rougeLsum"] == pytest.approx(50)


def test_rouge_uses_no_stemmer():
  assert metrics.rouge(["prices rising"], ["price rise"])["rouge1"] == 0


def _reference_bleu(hypotheses, references):
  """Plain corpus BLEU (whitespace tokens, one reference, no smoothing)."""
  matches, totals = [0] * 4, [0] * 4
  for hypothesis, reference in zip(hypotheses, references):
    hyp, ref = hypothesis.split(), reference.split()
    for n in range(1, 5):
      hyp_ngrams = collections.Counter(zip(*[hyp[i:] for i in range(n)]))
      ref_ngrams = collections.Counter(zip(*[ref[i:] for i in range(n)]))
      matches[n - 1] += sum((hyp_ngrams & ref_ngrams).values())
      totals[n - 1] += max(len(hyp) - n + 1, 0)
  hyp_len = sum(len(h.split()) for h in hypotheses)
  ref_len = sum(len(r.split()) for r in references)
  brevity_penalty = min(1.0, math.exp(1 - ref_len / hyp_len))
  log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
  return 100 * brevity_penalty * math.exp(log_precision)


def test_bleu_of_identical_corpus_is_100():
  corpus = ["Das Haus ist klein.", "Der Hund bellt laut, sagt sie."]
  assert metrics.bleu(corpus, corpus)["bleu"] == pytest.approx(100)


def test_bleu_matches_hand_counted_ngrams_and_brevity_penalty():
  reference, hypothesis = "the cat sat on a red mat", "the cat sat on the mat"
  # Clipped matches / hypothesis n-grams: 5/6, 3/5, 2/4, 1/3; the hypothesis
  # has 6 tokens against 7, so the brevity penalty is exp(1 - 7/6).
  expected = 100 * math.exp(1 - 7 / 6) * (5 / 6 * 3 / 5 * 2 / 4 * 1 / 3)**0.25
  assert _reference_bleu([hypothesis], [reference]) == pytest.approx(expected)
  assert metrics.bleu([reference], [hypothesis])["bleu"] == pytest.approx(
      expected, abs=1e-6)


def test_bleu_is_a_corpus_score_not_a_mean_of_sentence_scores():
  references = ["the cat sat on a red mat", "a dog barked at the old postman"]
  hypotheses = ["the cat sat on the mat", "a dog barked at the postman today"]
  assert metrics.bleu(references, hypotheses)["bleu"] == pytest.approx(
      _reference_bleu(hypotheses, references), abs=1e-6)


def test_bleu_without_a_matching_4gram_is_smoothed_exp_on_intl_tokens():
  references = ["Der Preis stieg um 3,5% auf 1.200 Euro—sagte sie.",
                "Das Haus (am See) ist klein!"]
  hypotheses = ["Der Preis fiel um 3,5% und 1.200 Euro—meinte er.",
                "Ein Haus (am Meer) war klein!"]
  # The intl tokenizer splits off the em dash, '%' and final punctuation: 13 + 9 hypothesis
  # tokens, as many reference ones (no brevity penalty). Clipped matches: 9 + 6 of 22 unigrams,
  # 5 + 3 of 20 bigrams ('Euro —' among them), 2 + 1 of 18 trigrams, none of 16 4-grams;
  # 'exp' smoothing counts that zero as 1/2 match.
  expected = 100 * (15 / 22 * 8 / 20 * 3 / 18 * 0.5 / 16)**0.25
  reference = sacrebleu.corpus_bleu(hypotheses, [references], smooth_method="exp",
                                    tokenize="intl", use_effective_order=False)
  assert reference.counts == [15, 8, 3, 0] and reference.score == pytest.approx(expected)
  assert metrics.bleu(references, hypotheses)["bleu"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("answer, normalized", [
    ("The Beatles", "beatles"),
    ("  An  Apple's   core ", "apple s core"),
    ("U.S.A.", "u s"),  # Punctuation to spaces leaves the article 'a'.
    ("Campbell-Bannerman", "campbell bannerman"),
    ("‘Sunset Blvd.’", "sunset blvd"),
    ("theatre", "theatre"),
])
def test_trivia_qa_normalization(answer, normalized):
  assert metrics.normalize_trivia_qa(answer) == normalized


def test_trivia_qa_takes_the_best_alias_and_averages_questions():
  targets = [["Sunset Boulevard", "Sunset Blvd."], ["Sunset Boulevard"]]
  # Q1: 'the sunset blvd' normalizes to the second alias: EM 1, F1 1.
  # Q2: 'sunset strip' vs 'sunset boulevard': 1 common token of 2 each -> F1
  # 1/2, EM 0.
  scores = metrics.trivia_qa(targets, ["The Sunset Blvd", "sunset strip"])
  assert scores["em"] == pytest.approx(50)
  assert scores["f1"] == pytest.approx(75)


def test_metrics_reject_mismatched_lengths_and_string_targets():
  with pytest.raises(ValueError, match="2 targets but 1 predictions"):
    metrics.rouge(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="lists of answer aliases"):
    metrics.trivia_qa(["York"], ["York"])


# ----------------------------------------- against t5.evaluation.metrics


def mini_corpus(corpus, mini_data_dir, monkeypatch):
  monkeypatch.setenv(mini.DATA_DIR_ENV, str(mini_data_dir))
  return [{k: v.decode() for k, v in ex.items()} for ex in mini.corpus_source(
      corpus).get_dataset("train").as_numpy_iterator()]


def rouge_pairs(mini_data_dir, monkeypatch):
  """MEDLINE titles, and as predictions the abstracts' first words."""
  examples = mini_corpus("title", mini_data_dir, monkeypatch)
  return ([ex["title"] for ex in examples],
          [" ".join(ex["abstract"].split()[:len(ex["title"].split())])
           for ex in examples])


def bleu_pairs(mini_data_dir, monkeypatch):
  """German sentences; predictions drop every third word or copy the English."""
  examples = mini_corpus("ende", mini_data_dir, monkeypatch)
  predictions = [ex["en"] if i % 5 == 0 else " ".join(
      w for j, w in enumerate(ex["de"].split()) if j % 3 != 2)
                 for i, ex in enumerate(examples)]
  return [ex["de"] for ex in examples], predictions


def trivia_qa_pairs(mini_data_dir, monkeypatch):
  """The TriviaQA sample's alias lists; predictions made from their aliases.

  For each alias: itself, upper-cased with an article, its first piece up to
  punctuation, and the next question's first alias.
  """
  del mini_data_dir, monkeypatch
  aliases = []
  with tarfile.open(sources.triviaqa_sample()) as archive:
    for member in sorted(archive.getnames()):
      if re.fullmatch(r"qa/.*-(train|dev)\.json", member):
        aliases += [[r["Answer"]["Value"], *r["Answer"]["Aliases"]] for r in
                    json.load(archive.extractfile(member))["Data"]]
  targets, predictions = [], []
  for i, question in enumerate(aliases):
    for alias in question:
      targets += [question] * 4
      predictions += [alias, f"The {alias.upper()}",
                      re.split(r"[^\w ]", alias)[0],
                      aliases[(i + 1) % len(aliases)][0]]
  return targets, predictions


@pytest.mark.parametrize("metric_fn, pairs", [
    (metrics.rouge, rouge_pairs),
    (metrics.bleu, bleu_pairs),
    (metrics.trivia_qa, trivia_qa_pairs),
])
def test_real_predictions_get_t5s_scores(t5_reference, mini_data_dir,
                                         monkeypatch, metric_fn, pairs):
  targets, predictions = pairs(mini_data_dir, monkeypatch)
  assert len(targets) >= 100
  t5_metric_fn = getattr(t5_reference.evaluation.metrics, metric_fn.__name__)
  np.random.seed(0)  # ROUGE's bootstrap draws from numpy's global generator.
  ours = metric_fn(targets, predictions)
  np.random.seed(0)
  assert ours == t5_metric_fn(targets, predictions)
  assert 0 < min(ours.values()) and max(ours.values()) < 100
