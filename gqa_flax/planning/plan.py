"""`gqa-plan`: will a gin config's run fit a TPU slice, with which batch, and how fast?

  gqa-plan --gin_file=experiments/uptrain_xxl_gqa8.gin --topology=v4-16
  gqa-plan --gin_file=models/t5_1_1/tiny.gin --topology=v4-8 --gin.NUM_PARTITIONS=2
  gqa-plan --table1 --topology=v4-16        # simulated Table 1 T_infer and Figure 6

Compiles on this machine for the slice through libtpu (the `tpu` extra): the run's train step
at its BATCH_SIZE and at the largest per-chip batch that fits, then greedy decoding (prefill
and one step) for MHA, MQA and GQA-G variants of the model at the largest batch up to
--max_decode_batch_per_chip that fits. Prints per-chip memory against HBM, flops, bytes
accessed, and times on the chip's roofline and from XLA's cost model.
"""
import sys
from typing import List

from absl import flags
import gin

from gqa_flax import errors
from gqa_flax.planning import decode_plan, report, search, table1, train_plan
from gqa_flax.planning.job import Job
from gqa_flax.planning.topology import Topology, TopologyPartitioner, get_topology
from gqa_flax.storage import write_json
from gqa_flax.training import gin_utils

flags.DEFINE_string("topology", "v4-8", "TPU slice by its Cloud name (v4-8 is 4 chips).")
flags.DEFINE_bool("train", True, "Plan the train step.")
flags.DEFINE_bool("decode", True, "Plan greedy decoding with MHA, MQA and GQA-G.")
flags.DEFINE_bool("search_batch", True, "Search the largest per-chip train batch that fits.")
flags.DEFINE_integer("max_train_batch_per_chip", 256, "Upper end of the train batch search "
                     "(per device: per chip on v4, v5e, v5p; per core on v3).")
flags.DEFINE_integer("decode_inputs_len", 2048, "Decoding input length (paper: 2048).")
flags.DEFINE_integer("decode_targets_len", 512, "Decoding output length (paper: 512).")
flags.DEFINE_integer("max_decode_batch_per_chip", 32, "Largest decode batch per chip tried "
                     "(paper: up to 32).")
flags.DEFINE_integer("decode_gqa_groups", 8, "G of the GQA-G decoding variant when the config "
                     "itself is not GQA.")
flags.DEFINE_bool("search_layouts", True, "Decoding: compile every layout of the slice (mesh "
                  "data x model; K/V heads the model axis does not divide replicated or "
                  "batch-partitioned) and keep the fastest; false: only the config's own.")
flags.DEFINE_string("json_out", None, "Also write the decoding plans, every layout tried, as "
                    "JSON to this file. With --table1 each model's search is saved there as "
                    "it finishes, and searches saved there with the same settings are reused "
                    "(an interrupted run, or more --figure6_groups, compiles only what is new).")
flags.DEFINE_bool("table1", False, "Print the simulated Table 1 T_infer and Figure 6 for "
                  "T5.1.1-XXL next to the paper's measurements (ignores --gin_file).")
flags.DEFINE_list("figure6_groups", [str(g) for g in table1.FIGURE6_GROUPS],
                  "--table1: the groups G of Figure 6's XXL models (64 = MHA).")
FLAGS = flags.FLAGS
_PLAN_GIN = "plan/plan.gin"


def plan_train(job: Job, topology: Topology) -> str:
  """The train step at the run's global batch and at the largest per-chip batch that fits."""
  partitioner = TopologyPartitioner(job.num_partitions, devices=topology.devices)
  hbm = topology.hbm_bytes
  devices = topology.num_devices
  steps = {}

  def compile_at(batch_size):
    if batch_size not in steps:
      steps[batch_size] = train_plan.compile_train_step(job, partitioner, batch_size)
    return steps[batch_size]

  compile_at(job.batch_size)
  best = None
  if FLAGS.search_batch:
    best, _ = search.largest_fitting(lambda b: compile_at(b * devices),
                                     search.powers_of_two(FLAGS.max_train_batch_per_chip), hbm)
  rows = [report.memory_row(f"train step, global batch {b}", f"{b / devices:g}", step,
                            topology.generation) for b, step in sorted(steps.items())]
  lengths = job.task_feature_lengths
  lines = [f"## Training on {topology.name} ({topology.num_chips} chips, {devices} devices, "
           f"mesh data={partitioner.data_parallel_size} x model={job.num_partitions}), "
           f"inputs {lengths['inputs']} / targets {lengths['targets']}",
           report.table(report.MEMORY_HEADER, rows)]
  if FLAGS.search_batch:
    lines.append(f"largest per-device batch that fits (powers of two up to "
                 f"{FLAGS.max_train_batch_per_chip}): {best}")
  return "\n".join(lines)


def plan_decoding(job: Job, topology: Topology) -> str:
  """Greedy decoding for the model's MHA, MQA and GQA-G variants."""
  config = job.model.config
  is_gqa = 1 < config.num_kv_heads < config.num_heads
  groups = config.num_kv_heads if is_gqa else FLAGS.decode_gqa_groups
  configs = [config.replace(num_kv_heads=kv, cross_num_kv_heads=kv)
             for kv in (config.num_heads, 1, groups)]
  searches = [_search(c, topology, job.num_partitions) for c in configs]
  if FLAGS.json_out:
    write_json(FLAGS.json_out, [s.to_json(topology) for s in searches])
  return report.decode_table(searches, topology, FLAGS.decode_inputs_len,
                             FLAGS.decode_targets_len)


def _search(config, topology: Topology, num_partitions: int) -> decode_plan.LayoutSearch:
  """Every layout of the slice (--search_layouts), or the run's own: NUM_PARTITIONS and
  Partitioner.kv_batch_partitioned."""
  if FLAGS.search_layouts:
    layouts = decode_plan.layouts(config, topology)
  else:
    layouts = [decode_plan.DecodeLayout(num_partitions, _kv_batch_partitioned())]
  return decode_plan.search_layouts(config, topology, FLAGS.decode_inputs_len,
                                    FLAGS.decode_targets_len, FLAGS.max_decode_batch_per_chip,
                                    layouts)


def _kv_batch_partitioned() -> bool:
  try:
    return bool(gin.query_parameter("Partitioner.kv_batch_partitioned"))
  except ValueError:  # not bound
    return False



def _check_model_bound() -> None:
  try:
    gin.query_parameter("%MODEL")
  except ValueError:
    raise errors.UserError("no model to plan: pass a gin file that sets MODEL, e.g. "
                           "--gin_file=experiments/uptrain_xxl_gqa8.gin or models/t5_1_1/xxl.gin"
                           ) from None


def main() -> None:
  topology = get_topology(FLAGS.topology)
  if FLAGS.table1:
    searches = table1.SavedSearches(FLAGS.json_out, topology, FLAGS.decode_inputs_len,
                                    FLAGS.decode_targets_len, FLAGS.max_decode_batch_per_chip)
    print(table1.simulate(searches, [int(g) for g in FLAGS.figure6_groups]))
    return
  _check_model_bound()
  job = Job()
  sections: List[str] = []
  if FLAGS.train:
    sections.append(plan_train(job, topology))
  if FLAGS.decode:
    sections.append(plan_decoding(job, topology))
  print("\n\n".join(sections))


def console() -> None:
  """`gqa-plan` console script: bad input and a missing libtpu end in one line, exit 1."""
  sys.argv[1:1] = [f"--gin_file={_PLAN_GIN}"]
  # It compiles for a slice it is not on (no pod to join), for any config, complete or not.
  gin_utils.run(main, "gqa-plan", __doc__, join_pod=False, flag_modules=[__name__],
                read_by_code=["MODEL"], require_complete=False)


if __name__ == "__main__":
  console()
