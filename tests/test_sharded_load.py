"""checkpoints.load_sharded on 8 simulated CPU devices: T5X legacy (inline and zarr arrays),
our Orbax layout and HF restore onto the mesh in bfloat16, equal to `checkpoints.load`, with
sharded kernels split across devices and read by slices (tests/sharded_load_check.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path


from gqa_flax import checkpoints
from gqa_flax.checkpoints import t5x_legacy
from gqa_flax.checkpoints.arrays import flatten
from test_checkpoints import hf_dir  # noqa: F401  (pytest fixture)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T5X_TINY = str(Path(ROOT).parent / "shared" / "fixtures" / "t5x" / "test_t5_tiny.checkpoint_0")
NUM_PARTITIONS = 4  # A (2 data, 4 model) mesh.


def test_every_format_loads_sharded_and_equal(tmp_path, hf_dir):  # noqa: F811
  hf_path, _ = hf_dir
  config, params = checkpoints.load(T5X_TINY)
  zarr = str(tmp_path / "legacy" / "checkpoint_0")
  t5x_legacy.write_t5x_legacy(zarr, flatten(params), 0, inline_max_bytes=1000)
  orbax = str(tmp_path / "orbax")
  checkpoints.save(orbax, 0, params, config)
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_load_check.py"),
                        str(NUM_PARTITIONS), T5X_TINY, zarr, orbax, hf_path],
                       env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  results = {r["path"]: r for r in map(json.loads, out.stdout.splitlines())}
  assert list(results) == [T5X_TINY, zarr, orbax, hf_path]
  for path, result in results.items():
    assert result["devices"] == 8 and result["mesh"] == {"data": 2, "model": NUM_PARTITIONS}
    assert result["differ"] == [], path
    # Kernels over heads/mlp and the vocab-sharded embedding: no device holds them whole.
    assert {"token_embedder/embedding", "decoder/layers_0/mlp/wi_0/kernel",
            "encoder/layers_0/attention/query/kernel",
            "decoder/layers_0/self_attention/out/kernel"} <= set(result["partial"]), path
    assert "encoder/encoder_norm/scale" not in result["partial"]  # replicated
    assert result["whole_reads"] == [], path
