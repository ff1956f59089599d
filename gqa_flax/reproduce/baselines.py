"""Simple baselines of the mini tasks, and a fine-tuned model's margin over them.

A model that learned its task beats a baseline that needs no learning: for abstract -> title
the first `LEAD_WORDS` words of the abstract, for en -> de the English sentence copied (names,
numbers and cognates score). Both are scored on the examples the model was scored on (the
evaluate stage's `{task}-predictions.jsonl`), per example, so the margin is paired:

* ROUGE-1: each example's F-measure x 100 (rouge-score, no stemmer, as `metrics.rouge`); the
  score is their mean.
* BLEU: each example's sufficient statistics (n-gram matches and totals, lengths; sacrebleu's
  international tokenizer and exp smoothing, as `metrics.bleu`); the score is the corpus BLEU
  of their sum, which is what `metrics.bleu` computes.

The margin's interval resamples seeds, then examples (`statistics.bootstrap`), recomputing
both scores from the resampled examples.
"""
import json
from typing import Dict, List, Optional, Sequence

import numpy as np
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sacrebleu.metrics.bleu import MAX_NGRAM_ORDER

from gqa_flax.reproduce import statistics

LEAD_WORDS = 12
ENDE_PREFIX = "translate English to German: "
_BLEU = BLEU(tokenize="intl", smooth_method="exp")


def lead_words(inputs: str) -> str:
  return " ".join(inputs.split()[:LEAD_WORDS])


def copy_english(inputs: str) -> str:
  return inputs[len(ENDE_PREFIX):] if inputs.startswith(ENDE_PREFIX) else inputs


# task -> (what the baseline predicts, prediction from the input text)
BASELINES: Dict[str, tuple] = {
    "gqa_mini_title": (f"the abstract's first {LEAD_WORDS} words", lead_words),
    "gqa_mini_ende": ("the English input copied", copy_english),
}


def rouge1_per_example(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
  """[examples] ROUGE-1 F-measure x 100."""
  scorer = rouge_scorer.RougeScorer(["rouge1"])
  return np.asarray([100 * scorer.score(target, prediction)["rouge1"].fmeasure
                     for target, prediction in zip(targets, predictions)], np.float64)


def bleu_statistics(targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
  """[examples, 2 + 2 * 4]: each example's (sys_len, ref_len, matches 1-4, totals 1-4)."""
  rows = []
  for target, prediction in zip(targets, predictions):
    score = _BLEU.corpus_score([prediction], [[target]])
    rows.append([score.sys_len, score.ref_len, *score.counts, *score.totals])
  return np.asarray(rows, np.float64)


def bleu_of_statistics(summed: Sequence[float]) -> float:
  """Corpus BLEU of summed sufficient statistics (sacrebleu, exp smoothing); the sums are
  counts (rounded: they may come back from means times the number of examples)."""
  sys_len, ref_len, *rest = (int(round(x)) for x in summed)
  return BLEU.compute_bleu(rest[:MAX_NGRAM_ORDER], rest[MAX_NGRAM_ORDER:], sys_len, ref_len,
                           smooth_method="exp").score


class Scorer:
  """A metric as per-example components whose means give the score (`score(*means)`)."""

  def __init__(self, metric: str):
    if metric not in ("rouge1", "bleu"):
      raise ValueError(f"no per-example form of metric {metric!r}")
    self.metric = metric

  def components(self, targets: Sequence[str], predictions: Sequence[str]) -> np.ndarray:
    """[components, examples]."""
    if self.metric == "rouge1":
      return rouge1_per_example(targets, predictions)[None]
    return bleu_statistics(targets, predictions).T

  def score(self, means: Sequence, num_examples: int) -> np.ndarray:
    """The score of each replicate's component means ([components] of [replicates] or
    scalars); BLEU's statistics are sums, so the means are scaled back by the examples."""
    if self.metric == "rouge1":
      return np.asarray(means[0], np.float64)
    columns = np.stack([np.atleast_1d(np.asarray(m, np.float64)) for m in means], -1)
    scores = [bleu_of_statistics(row * num_examples) for row in columns]
    return np.asarray(scores if np.ndim(means[0]) else scores[0], np.float64)


def read_predictions(path: str) -> List[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f]


def margin(metric: str, task: str, predictions_by_seed: Sequence[List[dict]]) -> Optional[dict]:
  """The model's score, the baseline's and the margin (model - baseline) with its 95% interval,
  over the seeds' predictions of the same examples; None for a task without a baseline."""
  if task not in BASELINES:
    return None
  name, baseline = BASELINES[task]
  scorer = Scorer(metric)
  examples = predictions_by_seed[0]
  targets = [e["targets"] for e in examples]
  if any([e["targets"] for e in seed] != targets for seed in predictions_by_seed):
    raise ValueError(f"{task}: the seeds' predictions are not of the same examples")
  model = np.stack([scorer.components(targets, [e["prediction"] for e in seed])
                    for seed in predictions_by_seed], 1)  # [components, seeds, examples]
  base = scorer.components(targets, [baseline(e["inputs"]) for e in examples])
  base = np.repeat(base[:, None], len(predictions_by_seed), 1)
  count, split = len(targets), len(model)

  def difference(*means):
    return scorer.score(means[:split], count) - scorer.score(means[split:], count)

  interval = statistics.bootstrap(difference, list(model) + list(base))
  return {"baseline": name, "metric": metric, "examples": count,
          "seeds": len(predictions_by_seed),
          "model_score": float(scorer.score([c.mean() for c in model], count)),
          "baseline_score": float(scorer.score([c.mean() for c in base], count)),
          "margin": interval.estimate, "ci95": [interval.low, interval.high]}
