"""T5's span-corruption pre-training objective (Raffel et al. 2020).

A faithful port of `t5.data.preprocessors.span_corruption` and its helpers
(the T5 library is not installable here). Each token sequence is cut to a raw
length chosen by `random_spans_helper` so that, after corruption, inputs and
targets fit their feature lengths exactly (568 raw tokens -> 512 / 114 for
T5.1.1). A random 15% of the tokens, in spans of mean length 3, is replaced in
the inputs by one sentinel per span; the targets hold the dropped spans, each
after its sentinel:

  tokens   We hold these truths to be self evident
  inputs   We hold <X> to be <Y> evident
  targets  <X> these truths <Y> self <Z>

Sentinels are the vocabulary's extra ids from the top down:
`vocab_size - 1, vocab_size - 2, ...`. Randomness is stateless and comes from
`seqio.map_over_dataset(num_seeds=1)`, so a seeded `Task.get_dataset` is
deterministic. Seeds are drawn as T5 draws them (one per example for each of
the random chunk, the split and the corruption; each split with
`stateless_split` as T5 splits it), so for the same seed and documents the
example stream is T5's, token for token (tests/test_span_corruption.py checks
this against the `t5` package).
"""
import functools

import gin
import seqio
import tensorflow as tf

from gqa_flax import errors
from gqa_flax.data import vocab

NOISE_DENSITY = 0.15
MEAN_NOISE_SPAN_LENGTH = 3.0
# T5 first picks a random chunk of at most this many tokens from each document.
MAX_DOCUMENT_TOKENS = 65536


def random_spans_helper(inputs_length, noise_density, mean_noise_span_length,
                        extra_tokens_per_span_inputs,
                        extra_tokens_per_span_targets):
  """Raw token length and targets length that make inputs exactly fit.

  Assumes one EOS is appended to inputs and to targets, and that each noise
  span costs `extra_tokens_per_span_inputs` sentinels in the inputs and each
  non-noise span `extra_tokens_per_span_targets` in the targets.

  Returns:
    (tokens_length, targets_length): how many raw tokens to give
    `random_spans_noise_mask`, and the resulting targets length (with EOS).
  """

  def inputs_and_targets_length(tokens_length):
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return (
        num_nonnoise_tokens + num_noise_spans * extra_tokens_per_span_inputs +
        1,
        num_noise_tokens + num_noise_spans * extra_tokens_per_span_targets + 1)

  tokens_length = inputs_length - 1
  while inputs_and_targets_length(tokens_length + 1)[0] <= inputs_length:
    tokens_length += 1
  _, targets_length = inputs_and_targets_length(tokens_length)
  # T5's hack: with density 0.5 prefer targets no longer than inputs.
  if noise_density == 0.5 and targets_length > inputs_length:
    tokens_length -= 1
    targets_length -= 1
  return tokens_length, targets_length


def _random_segmentation(num_items, num_segments, seed):
  """Splits `num_items` at random into `num_segments` non-empty segments.

  Returns:
    int32 [num_segments]: positive segment lengths summing to num_items.
  """
  first_in_segment = tf.pad(
      seqio.utils.stateless_shuffle(
          tf.cast(tf.range(num_items - 1) < num_segments - 1, tf.int32), seed),
      [[1, 0]])
  segment_id = tf.cumsum(first_in_segment)
  return tf.math.segment_sum(tf.ones_like(segment_id), segment_id)


def random_spans_noise_mask(length, noise_density, seeds,
                            mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH):
  """Boolean mask of `length` with random spans of noise.

  Deterministically num_noise_tokens = round(length * noise_density) (at least
  1, at most length - 1) and num_noise_spans = num_nonnoise_spans =
  max(1, round(num_noise_tokens / mean_noise_span_length)). Spans alternate
  non-noise, noise, ..., starting with non-noise; subject to that, every mask
  is equally likely.

  Args:
    length: int32 scalar, the token sequence length.
    noise_density: fraction of tokens to mark as noise.
    seeds: int32 [2, 2], two stateless seeds.
    mean_noise_span_length: mean length of a noise span.

  Returns:
    bool [length].
  """
  orig_length = length
  length = tf.maximum(length, 2)  # Avoid degenerate masks.
  num_noise_tokens = tf.cast(
      tf.round(tf.cast(length, tf.float32) * noise_density), tf.int32)
  num_noise_tokens = tf.minimum(tf.maximum(num_noise_tokens, 1), length - 1)
  num_noise_spans = tf.cast(
      tf.round(tf.cast(num_noise_tokens, tf.float32) / mean_noise_span_length),
      tf.int32)
  num_noise_spans = tf.maximum(num_noise_spans, 1)
  num_nonnoise_tokens = length - num_noise_tokens
  noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans,
                                            seeds[0])
  nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens,
                                               num_noise_spans, seeds[1])
  interleaved_span_lengths = tf.reshape(
      tf.stack([nonnoise_span_lengths, noise_span_lengths], axis=1),
      [num_noise_spans * 2])
  span_starts = tf.cumsum(interleaved_span_lengths)[:-1]
  span_start_indicator = tf.math.unsorted_segment_sum(
      tf.ones_like(span_starts), span_starts, length)
  span_num = tf.cumsum(span_start_indicator)
  is_noise = tf.equal(span_num % 2, 1)
  return is_noise[:orig_length]


def sentinel_id(vocabulary):
  """The first sentinel: the vocabulary's last (extra) id."""
  return vocabulary.vocab_size - 1


def noise_span_to_unique_sentinel(tokens, noise_mask, vocabulary):
  """Replaces each run of noise tokens with its own sentinel.

  Sentinels decrease along the sequence from `sentinel_id(vocabulary)`.
  """
  prev_token_is_noise = tf.pad(noise_mask[:-1], [[1, 0]])
  first_noise_tokens = tf.logical_and(noise_mask,
                                      tf.logical_not(prev_token_is_noise))
  subsequent_noise_tokens = tf.logical_and(noise_mask, prev_token_is_noise)
  sentinel = sentinel_id(vocabulary) + 1 - tf.cumsum(
      tf.cast(first_noise_tokens, tokens.dtype))
  tokens = tf.where(first_noise_tokens, sentinel, tokens)
  return tf.boolean_mask(tokens, tf.logical_not(subsequent_noise_tokens))


def nonnoise_span_to_unique_sentinel(tokens, noise_mask, vocabulary):
  """Replaces each run of non-noise tokens with its own sentinel."""
  return noise_span_to_unique_sentinel(tokens, tf.logical_not(noise_mask),
                                       vocabulary)


def select_random_chunk(dataset, max_length, feature_key="targets"):
  """Keeps one random aligned chunk of at most `max_length` tokens per example.

  Drops empty examples and every feature but `feature_key`. As in T5, each
  example's seed is split in two and the second half picks the chunk.
  """

  @seqio.map_over_dataset(num_seeds=1)
  def chunk(x, seed):
    tokens = x[feature_key]
    n_tokens = tf.shape(tokens)[0]
    num_segments = tf.cast(
        tf.math.ceil(tf.cast(n_tokens, tf.float32) / max_length), tf.int32)
    _, start_seed = tf.unstack(tf.random.experimental.stateless_split(seed))
    start = max_length * tf.random.stateless_uniform(
        [], maxval=num_segments, dtype=tf.int32, seed=start_seed)
    return {feature_key: tokens[start:tf.minimum(start + max_length, n_tokens)]}

  dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
  return chunk(dataset)


def reduce_concat_tokens(dataset, feature_key="targets", batch_size=128):
  """Concatenates the tokens of each `batch_size` consecutive examples."""
  dataset = dataset.map(lambda x: {feature_key: x[feature_key]},
                        num_parallel_calls=tf.data.AUTOTUNE)
  dataset = dataset.padded_batch(batch_size, padded_shapes={feature_key: [-1]})

  def concat(x):
    tokens = tf.reshape(x[feature_key], [-1])
    return {feature_key: tf.boolean_mask(tokens, tf.cast(tokens, tf.bool))}

  return dataset.map(concat, num_parallel_calls=tf.data.AUTOTUNE)


def split_tokens(dataset, max_tokens_per_segment, feature_key="targets"):
  """Splits each token sequence into segments of `max_tokens_per_segment`.

  The last segment of a sequence may be shorter; empty sequences are dropped.
  The split is deterministic but, as T5's, a seeded map: it takes its turn in
  `seqio.map_seed_manager`, so the corruption after it gets T5's seeds.
  """

  @seqio.map_over_dataset(num_seeds=1)
  def split(x, seed):
    del seed  # Drawn only to keep T5's order of seeds.
    tokens = x[feature_key]
    n_tokens = tf.shape(tokens)[0]
    num_segments = (n_tokens + max_tokens_per_segment -
                    1) // max_tokens_per_segment
    padding = num_segments * max_tokens_per_segment - n_tokens
    lengths = tf.concat([
        tf.fill([num_segments - 1], max_tokens_per_segment),
        [max_tokens_per_segment - padding]
    ], axis=0)
    segments = tf.reshape(tf.pad(tokens, [[0, padding]]),
                          [-1, max_tokens_per_segment])
    return {feature_key: segments, "length": lengths}

  dataset = dataset.filter(lambda x: tf.size(x[feature_key]) > 0)
  dataset = split(dataset).unbatch()
  return dataset.map(lambda x: {feature_key: x[feature_key][:x["length"]]},
                     num_parallel_calls=tf.data.AUTOTUNE)


# T5's denoise splits each example's seed this many ways: two for the noise
# mask, two each for the inputs and targets functions (unused by sentinels).
DENOISE_SEED_SPLITS = 6


def denoise_random_spans(dataset, vocabulary, noise_density,
                         mean_noise_span_length):
  """Turns each 'targets' sequence into span-corrupted inputs and targets."""

  @seqio.map_over_dataset(num_seeds=1)
  def corrupt(x, seed):
    tokens = x["targets"]
    mask_seeds = tf.random.experimental.stateless_split(
        seed, DENOISE_SEED_SPLITS)[:2]
    noise_mask = random_spans_noise_mask(
        tf.size(tokens), noise_density, mask_seeds,
        mean_noise_span_length=mean_noise_span_length)
    return {
        "inputs": noise_span_to_unique_sentinel(tokens, noise_mask,
                                                vocabulary),
        "targets": nonnoise_span_to_unique_sentinel(tokens, noise_mask,
                                                    vocabulary),
    }

  return corrupt(dataset)


@gin.configurable
def span_corruption(dataset, sequence_length, output_features,
                    mean_noise_span_length=MEAN_NOISE_SPAN_LENGTH,
                    noise_density=NOISE_DENSITY):
  """T5's span corruption on tokenized 'targets' (a seqio preprocessor).

  Picks a random chunk per document, concatenates documents, splits them into
  raw sequences of the length `random_spans_helper` gives for
  `sequence_length['inputs']`, and corrupts each. Append EOS afterwards
  (`seqio.preprocessors.append_eos_after_trim`).
  """
  tokens_length, targets_length = random_spans_helper(
      inputs_length=sequence_length["inputs"],
      noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length,
      extra_tokens_per_span_inputs=1,
      extra_tokens_per_span_targets=1)
  if sequence_length["targets"] < targets_length:
    raise errors.UserError(
        f"Span corruption of inputs length {sequence_length['inputs']} needs "
        f"targets length >= {targets_length}, got {sequence_length['targets']}.")
  dataset = select_random_chunk(dataset, max_length=MAX_DOCUMENT_TOKENS)
  dataset = reduce_concat_tokens(dataset, batch_size=128)
  dataset = split_tokens(dataset, max_tokens_per_segment=tokens_length)
  return denoise_random_spans(
      dataset, output_features["targets"].vocabulary,
      noise_density=noise_density,
      mean_noise_span_length=mean_noise_span_length)


def span_corruption_task_kwargs(source, vocabulary):
  """seqio.Task arguments of a T5 span-corruption task on `source`'s 'text'."""
  return dict(
      source=source,
      preprocessors=[
          functools.partial(seqio.preprocessors.rekey,
                            key_map={"inputs": None, "targets": "text"}),
          seqio.preprocessors.tokenize,
          seqio.CacheDatasetPlaceholder(),
          span_corruption,
          seqio.preprocessors.append_eos_after_trim,
      ],
      output_features={
          "inputs": seqio.Feature(vocabulary, add_eos=True, required=False),
          "targets": seqio.Feature(vocabulary, add_eos=True),
      },
      metric_fns=[])


C4_FEATURE_LENGTHS = {"inputs": 512, "targets": 114}

# T5.1.1's pre-training task: C4 (TFDS c4/en:3.1.0, read from the TFDS data
# dir, never downloaded) with T5's vocabulary.
seqio.TaskRegistry.add(
    "gqa_c4_span_corruption",
    **span_corruption_task_kwargs(
        seqio.TfdsDataSource(tfds_name="c4/en:3.1.0"), vocab.get_vocabulary()))
