"""T5 span corruption: lengths, noise-mask structure, sentinels, statistics,
and the example stream against Google's `t5` package on real text."""
import numpy as np
import pytest
import seqio
import tensorflow as tf

from gqa_flax.data import mini
from gqa_flax.data import span_corruption as sc

SEEDS = tf.constant([[1, 2], [3, 4]], tf.int32)
# Two task seeds and how many examples of each stream are compared with T5's.
STREAM_SEEDS = (0, 1234)
STREAM_EXAMPLES = 300


class _Vocab:
  """Just enough of a vocabulary for the sentinel functions."""
  vocab_size = 1000


def _mask(length, seeds=SEEDS):
  return sc.random_spans_noise_mask(length, 0.15, seeds).numpy()


def _spans(mask):
  """(start, end) of each run of True in `mask`."""
  padded = np.concatenate([[False], mask, [False]]).astype(int)
  starts, = np.nonzero(np.diff(padded) == 1)
  ends, = np.nonzero(np.diff(padded) == -1)
  return list(zip(starts, ends))


def _unique_sentinels_numpy(tokens, mask, first_sentinel):
  """Independent reference: one decreasing sentinel per run of masked tokens."""
  out, sentinel = [], first_sentinel
  for i, (token, masked) in enumerate(zip(tokens, mask)):
    if not masked:
      out.append(token)
    elif i == 0 or not mask[i - 1]:
      out.append(sentinel)
      sentinel -= 1
  return out


def _reconstruct(inputs, targets, vocab_size):
  """Substitutes the spans of `targets` back for the sentinels of `inputs`."""
  spans, current = {}, None
  for token in targets:
    if token >= vocab_size - 100:
      current = spans.setdefault(token, [])
    else:
      current.append(token)
  out = []
  for token in inputs:
    out.extend(spans[token] if token in spans else [token])
  return out, spans


def test_random_spans_helper_matches_t5_lengths():
  # Hand-computed: 568 raw tokens -> 85 noise in 28 spans -> 483 + 28 + EOS
  # = 512 inputs, 85 + 28 + EOS = 114 targets; 569 would give 513 inputs.
  assert sc.random_spans_helper(512, 0.15, 3.0, 1, 1) == (568, 114)
  # 141 -> 21 noise in 7 spans -> 120 + 7 + 1 = 128, 21 + 7 + 1 = 29.
  assert sc.random_spans_helper(128, 0.15, 3.0, 1, 1) == (141, 29)


@pytest.mark.parametrize("length", [2, 5, 17, 30, 31, 141, 568])
def test_noise_mask_structure(length):
  mask = _mask(length)
  num_noise = min(max(round(length * 0.15), 1), length - 1)
  spans = _spans(mask)
  assert mask.shape == (length,)
  assert mask.sum() == num_noise
  assert len(spans) == max(1, round(num_noise / 3))
  assert not mask[0]  # Spans alternate starting with non-noise.
  assert mask[-1]  # ...and end with noise (as many noise as non-noise spans).


def test_noise_mask_is_deterministic_given_seeds():
  np.testing.assert_array_equal(_mask(568), _mask(568))
  other = tf.constant([[5, 6], [7, 8]], tf.int32)
  assert not np.array_equal(_mask(568), _mask(568, other))


def test_sentinels_match_numpy_reference_and_reconstruct():
  rng = np.random.default_rng(0)
  for seed in range(20):
    tokens = rng.integers(3, 900, size=200).astype(np.int32)
    mask = _mask(200, tf.constant([[seed, 1], [seed, 2]], tf.int32))
    inputs = sc.noise_span_to_unique_sentinel(
        tf.constant(tokens), tf.constant(mask), _Vocab()).numpy()
    targets = sc.nonnoise_span_to_unique_sentinel(
        tf.constant(tokens), tf.constant(mask), _Vocab()).numpy()
    assert inputs.tolist() == _unique_sentinels_numpy(tokens, mask, 999)
    assert targets.tolist() == _unique_sentinels_numpy(tokens, ~mask, 999)
    input_sentinels = [t for t in inputs if t >= 900]
    target_sentinels = [t for t in targets if t >= 900]
    # Every input sentinel appears once in the targets, in the same order.
    assert input_sentinels == list(range(999, 999 - len(input_sentinels), -1))
    assert target_sentinels[:len(input_sentinels)] == input_sentinels
    reconstructed, _ = _reconstruct(inputs, targets, 1000)
    assert reconstructed == tokens.tolist()


def test_span_corruption_on_real_text_fits_512_114(mini_data_dir,
                                                   monkeypatch):
  """Noise density and span length over a few hundred real examples."""
  source, vocabulary = mini_pretrain_text(mini_data_dir, monkeypatch)
  documents = source.get_dataset("train")
  tokens = documents.map(
      lambda x: {"targets": vocabulary.encode_tf(x["text"])})
  output_features = {"targets": seqio.Feature(vocabulary)}
  with seqio.utils.map_seed_manager(0):
    dataset = sc.span_corruption(
        tokens, sc.C4_FEATURE_LENGTHS, output_features)
  examples = list(dataset.take(300).as_numpy_iterator())
  assert len(examples) >= 200
  noise = raw = spans = 0
  for example in examples:
    inputs, targets = example["inputs"], example["targets"]
    # Without EOS (appended later) the full examples are 511 / 113 long.
    assert len(inputs) <= 511 and len(targets) <= 113
    original, spans_of = _reconstruct(inputs, targets, vocabulary.vocab_size)
    assert all(t < vocabulary.vocab_size - 100 for t in original)
    noise += sum(map(len, spans_of.values()))
    raw += len(original)
    spans += len([t for t in inputs if t >= vocabulary.vocab_size - 100])
  full = [e for e in examples if len(e["inputs"]) + len(e["targets"]) >
          600]
  assert full and all(
      (len(e["inputs"]), len(e["targets"])) == (511, 113) for e in full)
  assert abs(noise / raw - 0.15) <= 0.02
  assert abs(noise / spans - 3.0) <= 0.5


def mini_pretrain_text(data_dir, monkeypatch):
  """The mini corpus' pre-training source and its vocabulary (100 extra ids)."""
  monkeypatch.setenv(mini.DATA_DIR_ENV, str(data_dir))
  vocabulary = seqio.SentencePieceVocabulary(
      str(mini.vocabulary_file(data_dir)), extra_ids=100)
  return mini.corpus_source("pretrain"), vocabulary


def stream(task, seed):
  """(inputs, targets) token lists of the first STREAM_EXAMPLES at 512/114."""
  dataset = task.get_dataset(sc.C4_FEATURE_LENGTHS, split="train",
                             shuffle=False, seed=seed, use_cached=False)
  return [(ex["inputs"].tolist(), ex["targets"].tolist())
          for ex in dataset.take(STREAM_EXAMPLES).as_numpy_iterator()]


def test_span_corruption_stream_is_t5s_token_for_token(
    mini_data_dir, monkeypatch, t5_reference):
  """Same seed, same documents: the examples of T5's C4 task, in order.

  T5's side is the preprocessor list of `c4_v220_span_corruption` (the real
  t5 package) on the same source, vocabulary and output features.
  """
  source, vocabulary = mini_pretrain_text(mini_data_dir, monkeypatch)
  ours = sc.span_corruption_task_kwargs(source, vocabulary)
  t5_preprocessors = seqio.get_mixture_or_task(
      "c4_v220_span_corruption").preprocessors
  assert sc.span_corruption not in t5_preprocessors  # T5's own function.
  tasks = {"ours": seqio.Task("gqa_test_span_corruption", **ours),
           "t5": seqio.Task("t5_test_span_corruption",
                            **{**ours, "preprocessors": t5_preprocessors})}
  first_examples = []
  for seed in STREAM_SEEDS:
    ours_stream, t5_stream = (stream(tasks[k], seed) for k in ("ours", "t5"))
    assert len(ours_stream) == len(t5_stream) == STREAM_EXAMPLES
    differing = [i for i, (a, b) in enumerate(zip(ours_stream, t5_stream))
                 if a != b]
    assert not differing, f"seed {seed}: examples {differing[:5]}... differ"
    full = [ex for ex in ours_stream if (len(ex[0]), len(ex[1])) == (512, 114)]
    assert len(full) >= STREAM_EXAMPLES - 5  # The C4 lengths, EOS included.
    first_examples.append(ours_stream[0])
  assert first_examples[0] != first_examples[1]  # The seed matters.


def test_targets_length_too_short_is_an_error():
  with pytest.raises(ValueError, match="targets length >= 114"):
    sc.span_corruption(tf.data.Dataset.range(1), {"inputs": 512,
                                                  "targets": 100}, {})


def test_c4_task_is_t5_span_corruption_of_c4_en():
  task = seqio.get_mixture_or_task("gqa_c4_span_corruption")
  assert task.source.tfds_dataset.name == "c4/en:3.1.0"
  assert sc.span_corruption in task.preprocessors
  assert task.preprocessors[-1] is seqio.preprocessors.append_eos_after_trim
  assert all(f.add_eos for f in task.output_features.values())
  assert sc.C4_FEATURE_LENGTHS == {"inputs": 512, "targets": 114}
