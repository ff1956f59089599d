"""Decode timing, and the Figure 6 stages: time per sample vs the number of groups.

  python -m gqa_flax.reproduce.timing --checkpoint CKPT --groups 1,2,4,8 --inputs 2048 \\
    --targets 512 --batch_size 8 --repeats 5 --output result.json
  python -m gqa_flax.reproduce.timing --model_gin reproduce/mini/kv_bound_shape.gin ...

With `--checkpoint` each G converts the multi-head checkpoint CKPT with gqa_flax's converter
(mean pooling) in memory; with `--model_gin` each G is the gin file's model shape with G
key/value heads and random weights (timing needs no trained weights: it times a shape, e.g.
one large enough that reading the key/value cache dominates a decode step). Each G then times
greedy decoding of `--targets` tokens (EOS disabled so every sample decodes the full length,
as in the paper's fixed 2048/512 setup) from random input tokens, with the partitioned
decoding of `training.predictor` on a mesh of `--num_partitions`-way model parallelism (every
host of a pod runs the command; process 0 writes the result).
"""
import dataclasses
import sys
from typing import Any, Callable, Iterable, Iterator, List, Sequence, Tuple

import flax.linen as nn
import gin
import jax
import numpy as np

from gqa_flax import errors, pod
from gqa_flax.benchmarks import runners
from gqa_flax.checkpoints.convert import convert_arrays
from gqa_flax.checkpoints.reader import open_checkpoint
from gqa_flax.checkpoints.arrays import unflatten
from gqa_flax.models import T5Config
from gqa_flax.storage import write_json
from gqa_flax.training import gin_utils, predictor
from gqa_flax.training.encoder_decoder import EncoderDecoderModel
from gqa_flax.training.partitioning import Partitioner

_INIT_SHAPES = {"encoder_input_tokens": (1, 1), "decoder_input_tokens": (1, 1)}


def per_sample_times(decode: Callable[[], jax.Array], batch_size: int,
                     repeats: int) -> List[float]:
  """Wall time of each of `repeats` runs of `decode()` / batch_size; one untimed warm-up run
  compiles first."""
  seconds = runners.timed(lambda: jax.block_until_ready(decode()), repeats, "decode")
  return [s / batch_size for s in seconds]


def seconds_per_sample(decode: Callable[[], jax.Array], batch_size: int, repeats: int) -> float:
  """The median of `per_sample_times`."""
  return runners.median(per_sample_times(decode, batch_size, repeats))


def converted_models(checkpoint: str, groups: Sequence[int]) -> Iterator[Tuple[T5Config, Any]]:
  """(config, host params) of the multi-head `checkpoint` mean-pooled to each G in turn."""
  source = open_checkpoint(checkpoint)
  for g in groups:
    config, arrays, _ = convert_arrays(source, g, method="mean")
    yield config, unflatten({name: np.asarray(array.read()) for name, array in arrays.items()})


def random_models(config: T5Config, groups: Sequence[int]) -> Iterator[Tuple[T5Config, Any]]:
  """(config, host params) of `config`'s shape with G key/value heads, randomly initialised."""
  for g in groups:
    model = EncoderDecoderModel(config.replace(num_kv_heads=g))
    boxed = jax.jit(lambda rng: model.init(rng, _INIT_SHAPES))(jax.random.key(g))
    yield model.config, jax.device_get(nn.meta.unbox(boxed))


@dataclasses.dataclass(frozen=True)
class Layout:
  """How one G is decoded: `num_partitions`, `kv_batch_partitioned`, the global batch."""
  num_partitions: int
  kv_batch_partitioned: bool
  batch_size: int

  def partitioner(self) -> Partitioner:
    return Partitioner(self.num_partitions, kv_batch_partitioned=self.kv_batch_partitioned)


def parse_layouts(values: Sequence[str], default: Layout) -> Callable[[int], Layout]:
  """`--layout G=PARTITIONS[:split][:BATCH]` values (e.g. `1=8:split:256`, `64=8::64`) ->
  the layout of each G; a G not given takes `default`."""
  layouts = {}
  for value in values:
    try:
      groups, spec = value.split("=")
      partitions, split, batch = (spec.split(":") + ["", ""])[:3]
      if split not in ("", "split"):
        raise ValueError(split)
      layouts[int(groups)] = Layout(int(partitions), split == "split",
                                    int(batch) if batch else default.batch_size)
    except ValueError:
      raise errors.UserError(f"--layout {value!r}: expected G=PARTITIONS[:split][:BATCH], e.g. "
                             "1=8:split:256") from None
  return lambda g: layouts.get(g, default)


def time_groups(models: Iterable[Tuple[T5Config, Any]], inputs: int, targets: int,
                repeats: int, layout_of: Callable[[int], Layout]) -> list:
  """[{'kv_heads', 'attention', 't_infer_s' (median), 't_infer_repeats_s', 'layout'}] of each
  model, decoded in `layout_of(its kv_heads)`."""
  points = []
  for config, params in models:
    layout = layout_of(config.num_kv_heads)
    tokens = np.random.default_rng(0).integers(
        2, config.vocab_size, (layout.batch_size, inputs)).astype(np.int32)
    decoder = predictor.from_host_params(EncoderDecoderModel(config), params,
                                         layout.partitioner())
    times = per_sample_times(lambda: decoder.predict(tokens, targets, eos_id=runners.NEVER_EOS),
                             layout.batch_size, repeats)
    t = runners.median(times)
    points.append({"kv_heads": config.num_kv_heads, "attention": config.attention_name,
                   "t_infer_s": t, "t_infer_repeats_s": times,
                   "layout": dataclasses.asdict(layout)})
    if pod.is_writer():
      split = ", K/V batch-partitioned" if layout.kv_batch_partitioned else ""
      print(f"fig6: {config.attention_name}: {t * 1e3:.2f} ms/sample (inputs {inputs}, "
            f"outputs {targets}, batch {layout.batch_size}, model parallel "
            f"{layout.num_partitions}{split})", flush=True)
  return points


def model_config(model_gin: str, bindings: Sequence[str]) -> T5Config:
  """The T5Config that a model gin file (configs/models/..., with `bindings`) builds."""
  gin.clear_config()
  gin_utils.parse_gin([model_gin], list(bindings))
  return gin.query_parameter("%MODEL").scoped_configurable_fn().config


def main(argv=None) -> int:
  parser = errors.ArgumentParser(prog="gqa_flax.reproduce.timing", description=__doc__.split(
      "\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--checkpoint", help="multi-head checkpoint, mean-pooled to each G")
  source.add_argument("--model_gin", help="a model gin file: its shape, random weights")
  parser.add_argument("--gin_bindings", action="append", default=[],
                      help="bindings of --model_gin, e.g. t5_1_1_config.num_heads=8")
  parser.add_argument("--groups", required=True, help="comma-separated G values")
  parser.add_argument("--inputs", type=int, required=True, help="input length")
  parser.add_argument("--targets", type=int, required=True, help="decoded tokens")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--num_partitions", type=int, default=1, help="model-parallel size")
  parser.add_argument("--layout", action="append", default=[],
                      help="G=PARTITIONS[:split][:BATCH]: how G is decoded, e.g. gqa-plan's "
                      "choice (split: Partitioner.kv_batch_partitioned); others: "
                      "--num_partitions, replicated K/V, --batch_size")
  parser.add_argument("--output", required=True, help="result JSON file")
  pod.add_flags(parser)
  args = parser.parse_args(argv)
  try:
    pod.initialize(**pod.flags_of(args))
    groups = [int(g) for g in args.groups.split(",")]
    models = converted_models(args.checkpoint, groups) if args.checkpoint else random_models(
        model_config(args.model_gin, args.gin_bindings), groups)
    layout_of = parse_layouts(args.layout, Layout(args.num_partitions, False, args.batch_size))
    points = time_groups(models, args.inputs, args.targets, args.repeats, layout_of)
  except (ValueError, OSError) as e:
    print(f"gqa_flax.reproduce.timing: error: {str(e).splitlines()[0]}", file=sys.stderr)
    return 1
  if pod.is_writer():
    write_json(args.output, {"points": points, "inputs": args.inputs, "targets": args.targets,
                             "batch_size": args.batch_size, "repeats": args.repeats,
                             "source": args.checkpoint or args.model_gin,
                             "num_partitions": args.num_partitions, "devices": jax.device_count(),
                             "device": jax.devices()[0].device_kind})
  return 0


if __name__ == "__main__":
  sys.exit(main())
