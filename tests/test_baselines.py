"""Task baselines and margins (gqa_flax/reproduce/baselines.py) against hand-computed values,
the project's corpus metrics and numpy bootstrap resamples."""
import numpy as np
import pytest

from gqa_flax.evaluation import metrics
from gqa_flax.reproduce import baselines, statistics

# Real-looking German references and system outputs (a model's, an English copy's).
TARGETS = ["Das Haus ist sehr alt und steht am Ende der Straße.",
           "Ich habe heute keine Zeit, um ins Kino zu gehen.",
           "Der Zug nach Berlin fährt um 10 Uhr ab.",
           "Sie hat das Buch schon zweimal gelesen.",
           "Wir treffen uns morgen im Park."]
MODEL = ["Das Haus ist alt und steht am Ende der Straße.",
         "Ich habe heute keine Zeit für das Kino.",
         "Der Zug nach Berlin fährt um 10 Uhr.",
         "Sie hat das Buch gelesen.",
         "Wir treffen morgen im Park."]
ENGLISH = ["The house is very old and stands at the end of the street.",
           "I have no time today to go to the cinema.",
           "The train to Berlin leaves at 10 o'clock.",
           "She has already read the book twice.",
           "We meet tomorrow in the park."]


def test_the_baselines_predict_from_the_input_alone():
  abstract = " ".join(f"w{i}" for i in range(30))
  assert baselines.lead_words(abstract) == " ".join(f"w{i}" for i in range(baselines.LEAD_WORDS))
  assert baselines.copy_english("translate English to German: The cat sleeps.") == \
      "The cat sleeps."


def test_rouge1_per_example_is_the_hand_computed_f_measure():
  # 'a b c d' vs 'a b x': precision 2/3, recall 2/4, F = 2 P R / (P + R) = 4/7.
  np.testing.assert_allclose(baselines.rouge1_per_example(["a b c d"], ["a b x"]), [400 / 7])


@pytest.mark.parametrize("predictions", [MODEL, ENGLISH])
def test_summed_bleu_statistics_give_the_corpus_bleu(predictions):
  stats = baselines.bleu_statistics(TARGETS, predictions)
  assert stats.shape == (5, 10)
  assert baselines.bleu_of_statistics(stats.sum(0)) == pytest.approx(
      metrics.bleu(TARGETS, predictions)["bleu"], abs=1e-9)


def _rows(predictions, inputs):
  return [{"inputs": i, "targets": t, "prediction": p}
          for i, t, p in zip(inputs, TARGETS, predictions)]


def test_bleu_margin_is_model_minus_copy_with_resampled_corpus_bleu():
  inputs = [f"translate English to German: {e}" for e in ENGLISH]
  result = baselines.margin("bleu", "gqa_mini_ende", [_rows(MODEL, inputs)])
  model_bleu = metrics.bleu(TARGETS, MODEL)["bleu"]
  copy_bleu = metrics.bleu(TARGETS, ENGLISH)["bleu"]
  assert result["model_score"] == pytest.approx(model_bleu)
  assert result["baseline_score"] == pytest.approx(copy_bleu)
  assert result["margin"] == pytest.approx(model_bleu - copy_bleu)
  # The interval: the same resamples of examples (one seed), corpus BLEU recomputed on each.
  rng = np.random.default_rng(0)
  _, examples = statistics.resample_indices(1, 5, statistics.REPLICATES, rng)
  replicates = [metrics.bleu([TARGETS[i] for i in idx], [MODEL[i] for i in idx])["bleu"]
                - metrics.bleu([TARGETS[i] for i in idx], [ENGLISH[i] for i in idx])["bleu"]
                for idx in examples[:, 0]]
  np.testing.assert_allclose(result["ci95"], np.percentile(replicates, [2.5, 97.5]), atol=1e-9)


def test_rouge_margin_over_seeds_and_a_margin_of_nothing():
  abstracts = ["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi",
               "one two three four five six seven eight nine ten eleven twelve thirteen"]
  titles = ["alpha beta gamma", "one two nine"]
  seeds = [[{"inputs": a, "targets": t, "prediction": p} for a, t, p in zip(abstracts, titles, ps)]
           for ps in (["alpha beta", "one two"], ["alpha beta gamma", "two"])]
  result = baselines.margin("rouge1", "gqa_mini_title", seeds)
  per_seed = [baselines.rouge1_per_example(titles, [e["prediction"] for e in seed])
              for seed in seeds]
  lead = baselines.rouge1_per_example(titles, [baselines.lead_words(a) for a in abstracts])
  assert result["seeds"] == 2 and result["examples"] == 2
  assert result["margin"] == pytest.approx(np.mean(per_seed) - lead.mean())
  same = [[dict(e, prediction=baselines.lead_words(e["inputs"])) for e in seeds[0]]]
  assert baselines.margin("rouge1", "gqa_mini_title", same)["ci95"] == [0.0, 0.0]
  assert baselines.margin("rouge1", "some_other_task", seeds) is None
