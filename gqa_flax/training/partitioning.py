"""Mesh, logical-axis rules, NamedShardings and the data layout, like T5X's `PjitPartitioner`.

The mesh has two axes: 'data' (batch) and 'model' (of size `num_partitions`), laid out over the
physical topology by `jax.experimental.mesh_utils`. Parameters carry T5X's logical axis names;
`standard_logical_axis_rules` maps them to mesh axes. A parameter dimension that the mesh axis
does not divide -- the K/V kernels' joined_kv = kv_heads*head_dim when kv_heads is smaller
than the model axis, e.g. MQA -- is replicated instead (logged once per parameter), so MQA/GQA
run on any model-parallel size. Decoding such a model replicates its K/V caches over 'model'
too, or with `kv_batch_partitioned` splits their batch over 'data' x 'model' and runs its
attention on each device's rows (`cache_shardings`, `attention_shardings`).

Data layout (`data_layout`): the global batch is split into `data_parallel_size` slabs, one per
row of the mesh's 'data' axis, and read from `num_data_shards` data shards
(`seqio.ShardInfo(j, num_data_shards)`), shard j giving the batch's examples
[j * batch / num_data_shards, (j + 1) * batch / num_data_shards). A host reads the shards that
overlap its rows' examples and keeps its rows, so hosts that share rows (the model axis spanning
hosts) read identical data. By default there is one shard per row: the example stream depends on
the mesh, not on how many hosts there are (a pod and one process with as many devices see the
same global batches; where each host holds one row, this is T5X's one shard per host). A fixed
`num_data_shards` makes it independent of the mesh too: with `num_data_shards = 1` one device,
8 devices and a pod of any size train on the same batches (every host reads the whole stream and
keeps its rows: for small data, like the mini reproduction's). `global_batch` assembles a host's
rows into one array of the configured global shape, sharded over 'data'.
"""
import dataclasses
import functools
import logging
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np
import optax
import seqio
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gqa_flax import errors
from gqa_flax.training.adafactor import factored_dims

LogicalRules = Sequence[Tuple[str, Optional[str]]]


def standard_logical_axis_rules() -> LogicalRules:
  """T5X's standard rules: batch -> data; vocab, mlp, heads, joined_kv -> model; rest replicated."""
  return (("batch", "data"), ("vocab", "model"), ("mlp", "model"), ("heads", "model"),
          ("joined_kv", "model"), ("embed", None), ("kv", None), ("relpos_buckets", None),
          ("length", None))


@dataclasses.dataclass(frozen=True)
class DataLayout:
  """This host's part of the global batch (T5X's DataLayout, by mesh row; module docstring).

  batch_size: the global batch; num_shards: the data shards it is read from; shard_ids: the
  shards this host reads, ascending; offset, host_batch_size: the rows this host keeps of their
  concatenated batches ([per_shard_batch_size * len(shard_ids)] examples);
  is_first_host_in_replica_set: whether this host is the first of those reading the same rows.
  """
  batch_size: int
  num_shards: int
  shard_ids: Tuple[int, ...]
  is_first_host_in_replica_set: bool
  offset: int
  host_batch_size: int

  @property
  def per_shard_batch_size(self) -> int:
    return self.batch_size // self.num_shards

  @property
  def keeps_every_row(self) -> bool:
    """Whether this host keeps all the rows of the shards it reads."""
    read = self.per_shard_batch_size * len(self.shard_ids)
    return self.offset == 0 and self.host_batch_size == read

  @classmethod
  def of_rows(cls, batch_size: int, data_parallel_size: int, num_shards: int,
              rows: Sequence[int], is_first_host_in_replica_set: bool = True) -> "DataLayout":
    """The layout of a host holding the contiguous mesh `rows` of `data_parallel_size`, the
    batch read from `num_shards` shards."""
    if num_shards < 1 or batch_size % num_shards:
      raise errors.UserError(
          f"batch size {batch_size} is not divisible by Partitioner.num_data_shards="
          f"{num_shards}; set num_data_shards to a divisor of the batch size")
    per_row, per_shard = batch_size // data_parallel_size, batch_size // num_shards
    start, stop = rows[0] * per_row, (rows[-1] + 1) * per_row
    shard_ids = tuple(range(start // per_shard, (stop - 1) // per_shard + 1))
    return cls(batch_size, num_shards, shard_ids, is_first_host_in_replica_set,
               offset=start - shard_ids[0] * per_shard, host_batch_size=stop - start)

  def shard_infos(self) -> Tuple[seqio.ShardInfo, ...]:
    return tuple(seqio.ShardInfo(index=i, num_shards=self.num_shards) for i in self.shard_ids)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class Partitioner:
  """A ('data', 'model') mesh over all devices and the shardings of state and batches."""

  num_partitions: int = 1
  num_data_shards: Optional[int] = None  # None: one per row of the 'data' axis
  logical_axis_rules: LogicalRules = dataclasses.field(default_factory=standard_logical_axis_rules)
  # Decoding with fewer K/V heads than the model axis: False replicates their caches over
  # 'model'; True splits the batch over 'data' x 'model' for attention instead (Pope et al.).
  kv_batch_partitioned: bool = False

  def __post_init__(self):
    devices = jax.device_count()
    if self.num_partitions < 1 or devices % self.num_partitions:
      raise errors.UserError(
          f"num_partitions={self.num_partitions} must divide the {devices} devices; "
          "set Partitioner.num_partitions to a divisor")

  @functools.cached_property
  def mesh(self) -> Mesh:
    devices = mesh_utils.create_device_mesh((self.data_parallel_size, self.num_partitions),
                                            allow_split_physical_axes=True)
    return Mesh(devices, ("data", "model"))

  @property
  def data_parallel_size(self) -> int:
    return jax.device_count() // self.num_partitions

  @property
  def decode_batch_multiple(self) -> int:
    """What a decode batch is padded to a multiple of: the data axis, or every device when
    attention may split the batch over 'data' x 'model' (`kv_batch_partitioned`)."""
    if self.kv_batch_partitioned and self.mesh.shape["model"] > 1:
      return self.mesh.size
    return self.data_parallel_size

  def data_layout(self, batch_size: int) -> DataLayout:
    """The rows of the 'data' axis this host's devices hold (contiguous), as data shards."""
    self.check_batch_size(batch_size)
    rows_of = lambda process: tuple(sorted({
        row for row, devices in enumerate(self.mesh.devices)
        for device in devices if device.process_index == process}))
    rows = rows_of(jax.process_index())
    if rows != tuple(range(rows[0], rows[-1] + 1)):
      raise errors.UserError(
          f"process {jax.process_index()} holds mesh rows {rows}, which are not "
          "contiguous; use a num_partitions whose model groups do not interleave hosts")
    first = min(p for p in range(jax.process_count()) if rows_of(p) == rows)
    return DataLayout.of_rows(batch_size, self.data_parallel_size,
                              self.num_data_shards or self.data_parallel_size, rows,
                              first == jax.process_index())

  def check_batch_size(self, batch_size: int) -> None:
    if batch_size % self.data_parallel_size:
      raise errors.UserError(
          f"batch size {batch_size} is not divisible by the data-parallel size "
          f"{self.data_parallel_size} ({jax.device_count()} devices / num_partitions="
          f"{self.num_partitions}); change BATCH_SIZE or Partitioner.num_partitions")

  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec("data"))

  def global_batch(self, local_batch: dict, batch_size: int) -> dict:
    """This host's slabs (numpy [rows held * batch_size / data_parallel_size, ...]) -> global
    arrays [batch_size, ...] sharded over 'data'."""
    sharding = self.batch_sharding()
    return {name: jax.make_array_from_process_local_data(
        sharding, value, (batch_size,) + value.shape[1:]) for name, value in local_batch.items()}

  def splits_kv_batch(self, kv_heads: int) -> bool:
    """Whether attention with `kv_heads` K/V heads runs split by batch over 'data' x 'model'
    (`kv_batch_partitioned`, and the model axis does not divide the K/V heads)."""
    model = self.mesh.shape["model"]
    return self.kv_batch_partitioned and model > 1 and kv_heads % model != 0

  def cache_shardings(self, cache: Any) -> Any:
    """NamedShardings of a decode cache (arrays or ShapeDtypeStructs): K/V caches
    [batch, kv_heads, length, head_dim] (MQA's self-attention cache has no kv_heads axis)
    with the batch over 'data' and kv_heads over 'model' where the model axis divides them.
    With fewer K/V heads than the model axis (MQA; GQA-4 on 8) the K/V are replicated over
    'model', like their kernels, or with `kv_batch_partitioned` their batch is split over
    'data' x 'model'. cache_index is replicated."""
    def sharding(leaf):
      if leaf.ndim not in (3, 4):
        return self.replicated()
      kv_heads = leaf.shape[1] if leaf.ndim == 4 else 1
      spec = ["data"] + [None] * (leaf.ndim - 1)
      if self.splits_kv_batch(kv_heads):
        spec[0] = ("data", "model")
      elif leaf.ndim == 4 and kv_heads % self.num_partitions == 0:
        spec[1] = "model"
      return NamedSharding(self.mesh, self._divisible((), PartitionSpec(*spec), leaf.shape))
    return jax.tree.map(sharding, cache)

  def attention_shardings(self, kv_heads: int, heads: int, batch: int
                          ) -> Optional[Tuple[NamedSharding, NamedSharding]]:
    """(query/key/value sharding, output sharding) of a decode attention whose batch is split
    over 'data' x 'model' (`splits_kv_batch`), or None to leave the layout to XLA. Query
    [batch, q_len, heads, head_dim] and K/V [batch, kv_heads, length, head_dim] by batch;
    the output [batch, q_len, heads, head_dim] back in the standard layout (heads over
    'model'), where the output projection's kernel is split by heads."""
    if not self.splits_kv_batch(kv_heads) or batch % self.mesh.size:
      return None
    heads_axis = "model" if heads % self.mesh.shape["model"] == 0 else None
    return (NamedSharding(self.mesh, PartitionSpec(("data", "model"))),
            NamedSharding(self.mesh, PartitionSpec("data", None, heads_axis)))

  def param_shardings(self, boxed_params: Any) -> Any:
    """`init`'s LogicallyPartitioned tree (arrays or ShapeDtypeStructs) -> NamedShardings."""
    mesh_specs = nn.logical_to_mesh(nn.get_partition_spec(boxed_params), self.logical_axis_rules)
    shapes = nn.meta.unbox(boxed_params)
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, shape: NamedSharding(self.mesh, self._divisible(path, spec, shape.shape)),
        mesh_specs, shapes, is_leaf=lambda x: isinstance(x, PartitionSpec))

  def _divisible(self, path, spec: PartitionSpec, shape: Sequence[int]) -> PartitionSpec:
    """`spec` with every mesh axis that does not divide its dimension dropped (of several
    axes, the last ones first: ('data', 'model') -> 'data' -> None)."""
    axes = []
    for size, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
      joined = axis if isinstance(axis, tuple) else (axis,)
      while axis is not None and size % int(np.prod([self.mesh.shape[a] for a in joined])):
        logging.info("dim of %s of size %d not divisible by mesh axes %r: split over %r",
                     jax.tree_util.keystr(path), size, joined, joined[:-1] or None)
        joined = joined[:-1]
        axis = (joined if len(joined) > 1 else joined[0]) if joined else None
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
