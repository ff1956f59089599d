"""A quick look at GQA: one randomly initialised T5.1.1 model decoded as MHA, GQA and MQA.

    python -m gqa_flax.demo [--size tiny] [--batch 4] [--inputs_len 64] [--decode_len 32]

For each number of key/value heads it prints the decode cache bytes (self-attention and
cross-attention K/V scale with G/H) and the greedy decoding time per sample.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from gqa_flax import decoding, errors
from gqa_flax.benchmarks import runners
from gqa_flax.models import PRESETS, Transformer, t5_1_1_config


def _cache_bytes(cache) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(cache))


def main(argv=None) -> None:
  parser = errors.ArgumentParser(prog="gqa-demo", description=__doc__.split("\n")[0])
  parser.add_argument("--size", default="tiny", choices=PRESETS)
  parser.add_argument("--batch", type=errors.positive_int, default=4)
  parser.add_argument("--inputs_len", type=errors.positive_int, default=64)
  parser.add_argument("--decode_len", type=errors.positive_int, default=32)
  args = parser.parse_args(argv)

  base = t5_1_1_config(args.size, dtype="float32")
  inputs = jnp.asarray(np.random.RandomState(0).randint(2, base.vocab_size,
                                                        (args.batch, args.inputs_len)))
  print(f"T5.1.1-{args.size}: {base.num_heads} query heads, batch {args.batch}, "
        f"inputs {args.inputs_len}, decode {args.decode_len} tokens on {jax.devices()[0].platform}")
  kv_options = sorted({base.num_heads, *(g for g in (2, 1) if base.num_heads % g == 0)}, reverse=True)
  for kv_heads in kv_options:
    model = Transformer(base.replace(num_kv_heads=kv_heads))
    params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), inputs, inputs[:, :1],
                                               inputs[:, :1])["params"])
    encoded = jax.ShapeDtypeStruct(inputs.shape + (base.emb_dim,), jnp.float32)
    cache = jax.eval_shape(lambda p, e: decoding.init_decode_cache(model, p, e, inputs,
                                                                   args.decode_len), params, encoded)
    decode = lambda: decoding.greedy_decode(model, params, inputs, args.decode_len,
                                            eos_id=runners.NEVER_EOS).block_until_ready()
    per_sample = runners.timed(decode, 1, model.config.attention_name)[0] / args.batch
    tokens = decode()
    print(f"  {model.config.attention_name:>6} (kv_heads={kv_heads}): cache {_cache_bytes(cache) / 1e6:8.3f} MB,"
          f" {per_sample * 1e3:7.2f} ms/sample, first tokens {np.asarray(tokens[0, :6]).tolist()}")


if __name__ == "__main__":
  main()
