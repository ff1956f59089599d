"""A 4x2 (data x model) sharded train step equals the one-device step, for MHA and MQA.

Runs tests/sharded_step_check.py in a subprocess with 8 simulated CPU devices (XLA_FLAGS must
be set before jax starts), so this pytest process keeps its single device.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # one 8-device subprocess, ~20-30 s
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results():
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT,
             XLA_FLAGS="--xla_force_host_platform_device_count=8 "
             "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")
  out = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "sharded_step_check.py"), "4", "1"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  return {r["num_kv_heads"]: r for r in lines}


@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_sharded_step_matches_single_device(results, num_kv_heads):
  r = results[num_kv_heads]
  assert r["devices"] == 8 and r["mesh"] == {"data": 4, "model": 2}
  assert r["loss_sharded"] == pytest.approx(r["loss_single"], rel=1e-5)
  assert r["max_param_diff"] < 1e-5
  assert r["min_param_change"] > 1e-3  # every parameter was updated: the comparison is real
  assert r["query_spec"] == [None, "model"]


def test_kv_kernels_replicated_when_model_axis_does_not_divide(results):
  # tiny: head_dim 3; MQA joined_kv = 3 is not divisible by the model axis (2): replicated.
  assert results[1]["key_spec"] == [None, None]
  assert results[4]["key_spec"] == [None, "model"]


def test_batch_not_divisible_by_data_parallel_size(results):
  assert "not divisible by the data-parallel size 4" in results[4]["batch_error"]
