"""TPU slices by their Cloud names, as abstract devices from libtpu, and a mesh over them.

Cloud names count TensorCores for v3, v4 and v5p (two per chip; v4 and v5p run them as one
"megacore" device per chip) and chips for v5e. A "device" below is what JAX sees: one chip
for v4, v5p and v5e, one core (half a chip, 16 GiB) for v3.
"""
import dataclasses
import os
from typing import Tuple

import numpy as np
from jax.sharding import Mesh

from gqa_flax import errors
from gqa_flax.training.partitioning import Partitioner

GiB = 1024 ** 3
_INSTALL_HINT = 'libtpu is not installed; pip install -c constraints.txt -e ".[tpu]"'


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation's chip configuration and per-device HBM, bf16 peak and HBM bandwidth
  (Cloud TPU's published per-chip figures, halved for v3's two devices per chip)."""
  chip_config: str
  devices_per_chip: int
  hbm_bytes: int
  peak_flops: float
  hbm_bytes_per_second: float

  def roofline_seconds(self, flops: float, bytes_accessed: float) -> float:
    """Time of a program on one device if bound by compute or by HBM bandwidth, whichever binds."""
    return max(flops / self.peak_flops, bytes_accessed / self.hbm_bytes_per_second)


_GENERATIONS = {
    "v3": Generation("default", 2, 16 * GiB, 123e12 / 2, 900e9 / 2),
    "v4": Generation("megacore", 1, 32 * GiB, 275e12, 1228e9),
    "v5p": Generation("megacore", 1, 95 * GiB, 459e12, 2765e9),
    "v5e": Generation("default", 1, 16 * GiB, 197e12, 819e9),
}

# Cloud slice name -> libtpu topology (chips along each torus axis).
SLICES = {
    "v3-8": "v3:2x2", "v3-32": "v3:4x4", "v3-64": "v3:4x8", "v3-128": "v3:8x8",
    "v3-256": "v3:8x16", "v3-512": "v3:16x16",
    "v4-8": "v4:2x2x1", "v4-16": "v4:2x2x2", "v4-32": "v4:2x2x4", "v4-64": "v4:2x4x4",
    "v4-128": "v4:4x4x4", "v4-256": "v4:4x4x8", "v4-512": "v4:4x8x8",
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4",
    "v5p-128": "v5p:4x4x4",
    "v5e-1": "v5e:1x1", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4",
    "v5e-32": "v5e:4x8", "v5e-64": "v5e:8x8", "v5e-128": "v5e:8x16", "v5e-256": "v5e:16x16",
}


@dataclasses.dataclass(frozen=True)
class Topology:
  """A TPU slice: its Cloud `name`, libtpu `topology` string and abstract TPU `devices`."""
  name: str
  topology: str
  generation: Generation
  devices: Tuple

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def num_chips(self) -> int:
    return self.num_devices // self.generation.devices_per_chip

  @property
  def hbm_bytes(self) -> int:
    """HBM of one JAX device (memory_analysis() reports per device)."""
    return self.generation.hbm_bytes


def _libtpu_topologies():
  """jax.experimental.topologies, or a one-line error when libtpu is missing."""
  try:
    import libtpu  # noqa: F401 -- only to tell a missing extra apart from other errors
  except ImportError:
    raise errors.UserError(_INSTALL_HINT) from None
  # libtpu looks for a TPU VM's environment; these values only quieten its warnings. With no
  # TPU attached, several processes may compile at once (libtpu's lockfile would refuse).
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v4-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  from jax.experimental import topologies
  return topologies


def get_topology(name: str) -> Topology:
  """The slice `name` (e.g. 'v4-8'), compiled for on this machine through libtpu."""
  if name not in SLICES:
    raise errors.UserError(f"unknown TPU slice {name!r}; choose one of {', '.join(SLICES)}")
  topology = SLICES[name]
  generation = _GENERATIONS[topology.split(":")[0]]
  dims = [int(d) for d in topology.split(":")[1].split("x")]
  bounds = (min(2, dims[0]), min(2, dims[1]), 1)  # hosts of 2x2 chips (one chip for v5e-1)
  desc = _libtpu_topologies().get_topology_desc(
      platform="tpu", topology_name=topology, chip_config_name=generation.chip_config,
      chips_per_host_bounds=bounds, num_slices=1)
  return Topology(name, topology, generation, tuple(desc.devices))


@dataclasses.dataclass(frozen=True)
class TopologyPartitioner(Partitioner):
  """The training `Partitioner`'s shardings on a TPU slice's abstract devices.

  The base class builds its mesh from `jax.devices()`; this one from `devices`, so the same
  logical rules and K/V replication give the shardings a run on that slice would use.
  """
  devices: Tuple = ()

  def __post_init__(self):
    if self.num_partitions < 1 or len(self.devices) % self.num_partitions:
      raise errors.UserError(f"num_partitions={self.num_partitions} must divide the slice's "
                             f"{len(self.devices)} devices; set --gin.NUM_PARTITIONS to a divisor")

  @property
  def mesh(self) -> Mesh:
    devices = np.asarray(self.devices).reshape(self.data_parallel_size, self.num_partitions)
    return Mesh(devices, ("data", "model"))

  @property
  def data_parallel_size(self) -> int:
    return len(self.devices) // self.num_partitions
