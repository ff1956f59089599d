"""One ahead-of-time compiled program's per-device memory and XLA cost estimates."""
import dataclasses
import time
from typing import Callable, Optional

import jax


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """Per-device bytes from memory_analysis() and per-device cost from cost_analysis().

  `xla_seconds` is XLA's own estimate for one run (`optimal_seconds`; it can come out negative
  for large programs, i.e. meaningless). `oom` holds XLA's message when compilation itself ran
  out of memory (then every size is 0).
  """
  argument_bytes: int = 0
  output_bytes: int = 0
  alias_bytes: int = 0
  temp_bytes: int = 0
  code_bytes: int = 0
  flops: float = 0.0
  bytes_accessed: float = 0.0
  xla_seconds: float = 0.0
  compile_seconds: float = 0.0
  oom: Optional[str] = None
  module_name: str = ""  # the HLO module's name, e.g. jit_greedy_decode

  @property
  def total_bytes(self) -> int:
    """Peak HBM: inputs, outputs not aliased to donated inputs, temporaries and code."""
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes)

  def fits(self, hbm_bytes: int) -> bool:
    return self.oom is None and self.total_bytes <= hbm_bytes


def _cost(compiled) -> dict:
  """cost_analysis() is a dict in jax 0.10 and a list with one dict per program before."""
  cost = compiled.cost_analysis()
  return cost[0] if isinstance(cost, (list, tuple)) else cost


def compile_step(jitted: Callable, *args) -> CompiledStep:
  """jitted.lower(*args).compile(); args are ShapeDtypeStructs with shardings."""
  start = time.perf_counter()
  try:
    compiled = jitted.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return CompiledStep(compile_seconds=time.perf_counter() - start, oom=str(e).splitlines()[0])
  memory, cost = compiled.memory_analysis(), _cost(compiled)
  header = compiled.as_text().split("\n", 1)[0]  # HloModule NAME, attributes...
  return CompiledStep(
      argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes, flops=cost.get("flops", 0.0),
      bytes_accessed=cost.get("bytes accessed", 0.0), xla_seconds=cost.get("optimal_seconds", 0.0),
      compile_seconds=time.perf_counter() - start,
      module_name=header.split()[1].rstrip(",") if header.startswith("HloModule ") else "")
