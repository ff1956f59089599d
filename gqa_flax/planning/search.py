"""The largest batch whose compiled program fits in HBM."""
from typing import Callable, Optional, Protocol, Sequence, Tuple


class Fits(Protocol):
  """A compiled program or plan: does it fit in `hbm_bytes` per device?"""

  def fits(self, hbm_bytes: int) -> bool:
    ...


def largest_fitting(compile_at: Callable[[int], Fits], candidates: Sequence[int],
                    hbm_bytes: int) -> Tuple[Optional[int], dict]:
  """Tries `candidates` from the largest down -> (first that fits or None, {batch: what
  compile_at returned} of every batch compiled). Top-down is cheap: XLA rejects a program
  too big for HBM in seconds, while a program that fits costs a full compile."""
  compiled = {}
  for batch in sorted(candidates, reverse=True):
    compiled[batch] = step = compile_at(batch)
    if step.fits(hbm_bytes):
      return batch, compiled
  return None, compiled


def powers_of_two(limit: int) -> Tuple[int, ...]:
  """1, 2, 4, ... up to `limit`."""
  return tuple(2 ** i for i in range(limit.bit_length()) if 2 ** i <= limit)
