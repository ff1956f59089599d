"""Percentile bootstrap intervals of the reproduction's measures, and the verdict rule.

A sample is `[seeds, examples]` per-example values of one variant (held-out losses; for
timings, `[1, repeats]`). Every statistic here is a function of samples' means: a mean, a
difference of two means, a ratio of two differences. Its interval is a percentile bootstrap
interval (Efron and Tibshirani 1993, ch. 13): resample, recompute the statistic, take the
2.5th and 97.5th percentiles of the replicates.

* Paired samples (the same examples scored by several variants) share their resamples, so the
  variation between examples, which all variants see, cancels from a difference or a ratio.
* Seeds are combined by two-stage resampling (Davison and Hinkley 1997, section 3.8): each
  replicate draws the seeds with replacement, then the examples within each drawn seed, and
  averages; with one seed only the examples are drawn. Seed-to-seed variation (conversion
  `random`, data order, dropout) thus widens the interval as it should.
* The generator is seeded (`seed`), so a rerun gives the same intervals.
"""
import dataclasses
from typing import Callable, Optional, Sequence, Tuple

import numpy as np

REPLICATES = 2000
LEVEL = 0.95
DIRECTIONS = ("<", ">")


@dataclasses.dataclass(frozen=True)
class Interval:
  estimate: float  # the statistic of the samples themselves
  low: float
  high: float


def resample_indices(num_seeds: int, num_examples: int, replicates: int,
                     rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
  """(seeds [replicates, num_seeds], examples [replicates, num_seeds, num_examples]): the
  two-stage resamples; with one seed the seed index is always 0 (nothing is drawn for it)."""
  if num_seeds == 1:
    seeds = np.zeros((replicates, 1), np.int64)
  else:
    seeds = rng.integers(0, num_seeds, (replicates, num_seeds))
  examples = rng.integers(0, num_examples, (replicates, num_seeds, num_examples))
  return seeds, examples


def replicate_means(sample: np.ndarray, seeds: np.ndarray, examples: np.ndarray) -> np.ndarray:
  """[replicates] means of `sample` [seeds, examples] under the resamples."""
  return sample[seeds[:, :, None], examples].mean(axis=(1, 2))


def percentile_interval(replicates: np.ndarray, level: float = LEVEL) -> Tuple[float, float]:
  tail = 100 * (1 - level) / 2
  low, high = np.percentile(replicates, [tail, 100 - tail])
  return float(low), float(high)


def _as_sample(values) -> np.ndarray:
  sample = np.asarray(values, np.float64)
  if sample.ndim == 1:
    sample = sample[None]
  if sample.ndim != 2 or not sample.size or not np.all(np.isfinite(sample)):
    raise ValueError(f"a sample is [seeds, examples] of finite values, got shape {sample.shape}")
  return sample


def bootstrap(statistic: Callable[..., np.ndarray], samples: Sequence, paired: bool = True,
              replicates: int = REPLICATES, level: float = LEVEL, seed: int = 0) -> Interval:
  """`statistic(*means)` of the samples and its percentile interval.

  samples: each [seeds, examples] (or [examples]); paired samples must have the same shape
    (the same seeds and examples, in the same order) and share their resamples; unpaired ones
    (timings of different programs) are resampled each on its own.
  statistic: vectorised over numpy arrays of means (e.g. `lambda a, b: a - b`).
  """
  samples = [_as_sample(sample) for sample in samples]
  if paired and len({sample.shape for sample in samples}) > 1:
    raise ValueError(f"paired samples must have one shape, got {[s.shape for s in samples]}")
  rng = np.random.default_rng(seed)
  shared: Optional[Tuple[np.ndarray, np.ndarray]] = None
  means = []
  for sample in samples:
    if not paired or shared is None:
      shared = resample_indices(*sample.shape, replicates, rng)
    means.append(replicate_means(sample, *shared))
  with np.errstate(divide="ignore", invalid="ignore"):
    values = np.asarray(statistic(*means), np.float64)
    estimate = float(statistic(*[sample.mean() for sample in samples]))
  if not np.all(np.isfinite(values)):  # e.g. a ratio whose denominator can be 0: undefined
    return Interval(estimate, float("nan"), float("nan"))
  return Interval(estimate, *percentile_interval(values, level))


def verdict(interval: Interval, direction: str, threshold: float) -> str:
  """'reproduced' when the interval lies wholly on the paper's side of `threshold`
  (`direction` '<': below it; '>': above it), 'contradicted' when wholly on the other side,
  'inconclusive' otherwise (touching or straddling it, or undefined)."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction {direction!r} is not one of {DIRECTIONS}")
  below, above = interval.high < threshold, interval.low > threshold
  if not (below or above):
    return "inconclusive"
  return "reproduced" if below == (direction == "<") else "contradicted"
