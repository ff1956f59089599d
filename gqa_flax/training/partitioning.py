"""Mesh, logical-axis rules and NamedShardings, like T5X's `partitioning.PjitPartitioner`.

The mesh has two axes: 'data' (batch) and 'model' (of size `num_partitions`). Parameters carry
T5X's logical axis names; `standard_logical_axis_rules` maps them to mesh axes. A parameter
dimension that the mesh axis does not divide -- the K/V kernels' joined_kv = kv_heads*head_dim
when kv_heads is smaller than the model axis, e.g. MQA -- is replicated instead (logged once per
parameter), so MQA/GQA run on any model-parallel size.

Multi-host: `initialize_distributed` joins the hosts (jax.distributed.initialize), each host
reads its own slice of the data (`shard_info`, `seqio.ShardInfo`) and `global_batch` assembles
the per-host slices into one array sharded over 'data'.
"""
import dataclasses
import logging
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
import seqio
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gqa_flax.training.adafactor import factored_dims

LogicalRules = Sequence[Tuple[str, Optional[str]]]


def standard_logical_axis_rules() -> LogicalRules:
  """T5X's standard rules: batch -> data; vocab, mlp, heads, joined_kv -> model; rest replicated."""
  return (("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
          ("joined_kv", "model"), ("embed", None), ("kv", None), ("relpos_buckets", None),
          ("length", None))


@gin.configurable
def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Joins a multi-host run (TPU pods auto-detect; GPUs/CPUs pass the three arguments)."""
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A ('data', 'model') mesh over all devices and the shardings of state and batches."""

  num_partitions: int = 1
  logical_axis_rules: LogicalRules = dataclasses.field(default_factory=standard_logical_axis_rules)

  def __post_init__(self):
    devices = jax.device_count()
    if self.num_partitions < 1 or devices % self.num_partitions:
      raise ValueError(f"num_partitions={self.num_partitions} must divide the {devices} devices; "
                       "set Partitioner.num_partitions to a divisor")

  @property
  def mesh(self) -> Mesh:
    devices = np.asarray(jax.devices()).reshape(self.data_parallel_size, self.num_partitions)
    return Mesh(devices, ("data", "model"))

  @property
  def data_parallel_size(self) -> int:
    return jax.device_count() // self.num_partitions

  def shard_info(self) -> seqio.ShardInfo:
    """This host's slice of the data."""
    return seqio.ShardInfo(index=jax.process_index(), num_shards=jax.process_count())

  def check_batch_size(self, batch_size: int) -> None:
    if batch_size % self.data_parallel_size:
      raise ValueError(f"batch size {batch_size} is not divisible by the data-parallel size "
                       f"{self.data_parallel_size} ({jax.device_count()} devices / num_partitions="
                       f"{self.num_partitions}); change BATCH_SIZE or Partitioner.num_partitions")

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec("data"))

  def global_batch(self, local_batch: dict) -> dict:
    """This host's numpy batch slice -> global arrays sharded over 'data'."""
    sharding = self.batch_sharding()
    return {name: jax.make_array_from_process_local_data(sharding, value)
            for name, value in local_batch.items()}

  def param_shardings(self, boxed_params: Any) -> Any:
    """`init`'s LogicallyPartitioned tree (arrays or ShapeDtypeStructs) -> NamedShardings."""
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_params), self.logical_axis_rules)
    shapes = nn.meta.unbox(boxed_params)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, shape: NamedSharding(self.mesh, self._divisible(path, spec, shape.shape)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))

  def _divisible(self, path, spec: PartitionSpec, shape: Sequence[int]) -> PartitionSpec:
    """`spec` with every mesh axis that does not divide its dimension replaced by None."""
    axes = []
    for size, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      if axis is not None and size % self.mesh.shape[axis]:
        logging.info("replicating %s dim of size %d (not divisible by mesh axis %r of size %d)",
                     jax.tree_util.keystr(path), size, axis, self.mesh.shape[axis])
        axis = None
      axes.append(axis)
    return PartitionSpec(*axes)

  def opt_state_shardings(self, opt_state: Any, params: Any, param_shardings: Any) -> Any:
    """Adafactor state shardings: v follows its param, v_row/v_col drop the reduced dim."""
    replicated = self.replicated()

    def reduced(drop_index: int):
      def fn(param, sharding, leaf):
        dims = factored_dims(param.shape)
        if dims is None or leaf.ndim != param.ndim - 1:
          return replicated
        spec = list(sharding.spec) + [None] * (param.ndim - len(sharding.spec))
        del spec[dims[drop_index]]
        return NamedSharding(self.mesh, PartitionSpec(*spec))
      return fn

    def follow(param, sharding, leaf):
      return sharding if leaf.shape == param.shape else replicated

    def node(x):
      if isinstance(x, optax.FactoredState):
        return optax.FactoredState(
            count=replicated,
            v_row=jax.tree.map(reduced(1), params, param_shardings, x.v_row),
            v_col=jax.tree.map(reduced(0), params, param_shardings, x.v_col),
            v=jax.tree.map(follow, params, param_shardings, x.v))
      return replicated

    return jax.tree.map(node, opt_state, is_leaf=lambda x: isinstance(x, optax.FactoredState))
