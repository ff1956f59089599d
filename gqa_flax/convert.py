"""gqa-convert: multi-head T5 checkpoint -> GQA-G / MQA Orbax checkpoint.

  gqa-convert --src SRC --dst DST --num_kv_heads G [--cross_num_kv_heads G2]
              [--method mean|first|random] [--seed N] [--dtype float32|bfloat16] [--overwrite]
"""
import argparse
import sys

from gqa_flax.checkpoints.convert import DTYPES, METHODS, convert_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="gqa-convert",
      description="Convert a multi-head T5.1.1 checkpoint into grouped-query attention (GQA-G, "
      "or MQA with G=1) in the decoder's self- and cross-attention (Ainslie et al. 2023, 2.1). "
      "SRC may be an Orbax checkpoint (ours or T5X's), a legacy T5X checkpoint_<step> directory "
      "(or its msgpack file) or a HF transformers T5 v1.1 directory; DST is an Orbax checkpoint "
      "for gqa_flax.checkpoints.load and the trainer. Both may be gs:// URLs. Only the decoder's key/value kernels "
      "change; everything else is copied bit for bit. Optimizer state is NOT carried over: "
      "uptraining restarts Adafactor state, as T5X's sparse-upcycling recipe does.")
  parser.add_argument("--src", required=True, help="source checkpoint (format detected)")
  parser.add_argument("--dst", required=True, help="Orbax checkpoint directory to create")
  parser.add_argument("--num_kv_heads", type=int, required=True,
                      help="key/value heads G of decoder self-attention (must divide the heads)")
  parser.add_argument("--cross_num_kv_heads", type=int, default=None,
                      help="key/value heads of encoder-decoder attention (default: G)")
  parser.add_argument("--method", choices=METHODS, default="mean",
                      help="mean: mean-pool each group's heads (paper); first: keep each group's "
                      "first head; random: fresh initialisation (default: mean)")
  parser.add_argument("--seed", type=int, default=0, help="PRNG seed of --method random")
  parser.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                      help="storage dtype of the floating arrays (default: as in SRC)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    config = convert_checkpoint(args.src, args.dst, args.num_kv_heads, args.cross_num_kv_heads,
                                args.method, args.seed, args.dtype, args.overwrite)
  except (ValueError, OSError) as e:
    message = str(e).splitlines()[0]  # gin appends the configurable's name on a second line.
    print(f"gqa-convert: error: {message}", file=sys.stderr)
    return 1
  print(f"wrote {config.attention_name} checkpoint (num_kv_heads={config.num_kv_heads}, "
        f"cross_num_kv_heads={config.cross_num_kv_heads}) to {args.dst}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
