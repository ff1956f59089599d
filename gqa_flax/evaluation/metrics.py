"""Metrics as T5 computes them (t5/evaluation/metrics.py), seqio signature.

Every function takes `(targets, predictions)` and returns a dict of floats on a
0-100 scale.
"""
import collections
import re
import string

import numpy as np
import sacrebleu
from rouge_score import rouge_scorer
from rouge_score import scoring

ROUGE_TYPES = ("rouge1", "rouge2", "rougeLsum")
# The official TriviaQA evaluation turns these into spaces besides ASCII
# punctuation.
TRIVIA_QA_PUNCTUATION = frozenset(string.punctuation) | {"‘", "’", "´"}


def _split_sentences_for_rouge(summary):
  """T5's sentence splitting for rougeLsum: one sentence per line."""
  return summary.replace(" . ", " .\n")


def rouge(targets, predictions):
  """rouge1, rouge2 and rougeLsum: bootstrap mid F-measure x 100, no stemmer."""
  _check_same_length(targets, predictions)
  scorer = rouge_scorer.RougeScorer(rouge_types=ROUGE_TYPES)
  aggregator = scoring.BootstrapAggregator()
  for target, prediction in zip(targets, predictions):
    aggregator.add_scores(scorer.score(
        target=_split_sentences_for_rouge(target),
        prediction=_split_sentences_for_rouge(prediction)))
  result = aggregator.aggregate()
  return {key: result[key].mid.fmeasure * 100 for key in ROUGE_TYPES}


def bleu(targets, predictions):
  """Corpus BLEU with sacrebleu's international tokenizer, as T5 reports it."""
  _check_same_length(targets, predictions)
  score = sacrebleu.corpus_bleu(
      predictions, [list(targets)], smooth_method="exp", tokenize="intl",
      use_effective_order=False)
  return {"bleu": score.score}


def normalize_trivia_qa(answer):
  """Lower case, punctuation to spaces, drop the articles a/an/the, squash."""
  answer = answer.lower()
  answer = "".join(" " if c in TRIVIA_QA_PUNCTUATION else c for c in answer)
  answer = re.sub(r"\b(a|an|the)\b", " ", answer)
  return " ".join(answer.split())


def _exact_match(target, prediction):
  return float(target == prediction)


def _token_f1(target, prediction):
  target_tokens, prediction_tokens = target.split(), prediction.split()
  common = collections.Counter(target_tokens) & collections.Counter(
      prediction_tokens)
  num_same = sum(common.values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(target_tokens)
  return 2 * precision * recall / (precision + recall)


def trivia_qa(targets, predictions):
  """Exact match and token F1 x 100, each the best over a question's aliases.

  Args:
    targets: one list of answer aliases per question.
    predictions: one answer string per question.
  """
  _check_same_length(targets, predictions)
  em, f1 = [], []
  for aliases, prediction in zip(targets, predictions):
    if isinstance(aliases, str) or not aliases:
      raise ValueError("trivia_qa targets must be non-empty lists of answer "
                       f"aliases, got {aliases!r}.")
    aliases = [normalize_trivia_qa(a) for a in aliases]
    prediction = normalize_trivia_qa(prediction)
    em.append(max(_exact_match(a, prediction) for a in aliases))
    f1.append(max(_token_f1(a, prediction) for a in aliases))
  return {"em": 100 * float(np.mean(em)), "f1": 100 * float(np.mean(f1))}


def _check_same_length(targets, predictions):
  if len(targets) != len(predictions):
    raise ValueError(f"Got {len(targets)} targets but {len(predictions)} "
                     "predictions; they must match one to one.")
