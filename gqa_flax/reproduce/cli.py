"""gqa-reproduce: Table 1 and Figures 3-6 end to end.

  gqa-reproduce --preset mini --out runs/mini        # the offline CPU reproduction
  gqa-reproduce --preset smoke --out /tmp/smoke      # the same pipeline in ~5 minutes
  gqa-reproduce --preset paper --out /mnt/gqa/paper  # T5.1.1 Large/XXL, TPU VM (shared dir)
  gqa-reproduce --preset mini --out runs/mini --list # the stage view and commands, no run

Rerunning with the same --out skips finished stages and reruns failed ones. Writes
OUT/table1.md, OUT/table1.json, OUT/claims.json and OUT/claims.md (the paper's claims with
their intervals and verdicts, `claims.py`) and OUT/fig3.png ... OUT/fig6.png. On a pod every
host runs the
same command (TPU VMs: nothing to add; GPU/CPU clusters: T5X's --multiprocess_gpu
--coordinator_address=HOST:PORT --process_count=N --process_index=I, where the stages use the
ports after PORT); OUT may be a gs:// URL.
"""
import argparse
import os
import sys
import time

from gqa_flax import errors, pod
from gqa_flax.reproduce import claims, figures, report, runner
from gqa_flax.reproduce.presets import load_preset
from gqa_flax.reproduce.stages import Plan


def parse_args(argv=None) -> argparse.Namespace:
  parser = errors.ArgumentParser(
      prog="gqa-reproduce", description="Reproduce Table 1 and Figures 3-6 of Ainslie et al. "
      "(2023): prepare -> pre-train -> convert -> uptrain -> fine-tune -> evaluate -> time, "
      "each stage a run of the project's own CLI and gin configs.")
  parser.add_argument("--preset", required=True,
                      help="paper, mini, smoke (configs/reproduce/NAME.gin) or a preset gin file")
  parser.add_argument("--out", required=True, help="output directory (runs, logs, table, figures)")
  parser.add_argument("--data_dir", default=None,
                      help="where the mini corpus is prepared (default: OUT/data)")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="extra bindings of the preset, e.g. 'Preset.eval_examples=50'")
  parser.add_argument("--list", action="store_true", help="print the stages and exit")
  parser.add_argument("--heartbeat", type=float, default=30.0,
                      help="seconds between a running stage's progress lines")
  parser.add_argument("--tfds_data_dir", default=None,
                      help="TFDS data dir of the paper's tasks (default: $TFDS_DATA_DIR)")
  pod.add_flags(parser)
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  start = time.time()
  try:
    preset = load_preset(args.preset, args.gin_bindings)
    data_dir = args.data_dir or (os.path.join(args.out, "data") if preset.prepare else None)
    plan = Plan(preset, args.out, data_dir, args.tfds_data_dir)
    if args.list:
      stages = plan.stages()
      print(runner.stage_view(plan, stages))
      for stage in stages:
        print(f"\n# {stage.name}\n{' '.join(stage.argv)}")
      return 0
    pod_flags = pod.flags_of(args)
    pod.initialize(**pod_flags)
    pod.watch_for_failures("gqa-reproduce")
    if not pod.joined():
      pod_flags = None
    elif not pod_flags["coordinator_address"]:  # a TPU pod that joined by itself
      pod_flags = pod.own_flags()
    records = runner.run_all(plan, args.heartbeat, pod_flags)
    seconds = sum(r["seconds"] for r in records.values())
    if not pod.is_writer():
      return 0
    table = report.write_report(plan, records, seconds)
    claims.write_claims(plan.out, preset.name, claims.preset_claims(preset),
                        claims.measurements(records))
    bad = report.check_finite(table)
    if bad:
      raise ValueError(f"non-finite results: {'; '.join(bad)}")
    figures.draw_all(table, plan.out)
  except (ValueError, OSError, runner.StageError) as e:
    print(f"gqa-reproduce: error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  except KeyboardInterrupt:
    print("gqa-reproduce: interrupted (the running stage was stopped); rerun the same command "
          "to go on from the stages that finished", file=sys.stderr)
    return 130
  print(f"wrote {os.path.join(plan.out, 'table1.md')}, table1.json and fig3-6.png "
        f"(this invocation {time.time() - start:.0f} s, all stages {seconds:.0f} s)")
  return 0


def console() -> None:
  sys.exit(main())


if __name__ == "__main__":
  console()
