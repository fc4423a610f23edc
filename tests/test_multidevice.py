"""Sharded training on 8 fake CPU devices equals the 1-device run, and shards what the rules say.

The meshes run in one subprocess (tests/multidevice_check.py) because the device count must be
fixed before JAX is imported; this process may already have imported it with one device.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

MESHES = ("data8", "fsdp8", "tensor2_data4", "data2_fsdp2_tensor2")
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ)
    # LLVM -O0 halves XLA's CPU compile time; every mesh runs with it, the 1-device reference too.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "multidevice_check.py")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("mesh", MESHES)
def test_three_steps_match_one_device(results, mesh):
    r = results[mesh]
    assert r["max_loss_diff"] < 1e-5, r["losses"]
    assert r["max_grad_norm_rel_diff"] < 1e-5, r["grad_norms"]
    assert r["max_param_diff"] < 1e-5


@pytest.mark.parametrize("mesh", MESHES)
def test_params_are_sharded_as_the_rules_say(results, mesh):
    for path, p in results[mesh]["inspected"].items():
        assert p["spec"] == p["expected_spec"], path
        assert p["shard_shape"] == p["expected_shard_shape"], path


def test_fsdp_and_tensor_split_the_arrays(results):
    """Spot checks in numbers, so the test does not only compare our code with itself."""
    shard = lambda mesh, path: results[mesh]["inspected"][path]["shard_shape"]
    assert shard("data8", "embedding") == [128, 64]  # pure data parallel: replicated
    assert shard("fsdp8", "embedding") == [128, 8]  # embed split 8 ways
    assert shard("tensor2_data4", "block_0/attn/query/kernel") == [64, 2, 16]  # 4 heads / 2
    assert shard("tensor2_data4", "block_0/attn/key/kernel") == [64, 1, 16]  # 2 kv heads / 2
    assert shard("data2_fsdp2_tensor2", "block_0/mlp/up/kernel") == [32, 128]
    assert shard("data2_fsdp2_tensor2", "block_0/mlp/down/kernel") == [128, 32]


@pytest.mark.parametrize(
    "mesh,rows", [("data8", 2), ("fsdp8", 2), ("tensor2_data4", 4), ("data2_fsdp2_tensor2", 4)]
)
def test_batch_is_split_over_data_and_fsdp(results, mesh, rows):
    assert results[mesh]["batch"]["spec"] == "P(('data', 'fsdp'), None)"
    assert results[mesh]["batch"]["shard_rows"] == rows  # of 16


def test_indivisible_dimension_names_the_parameter(results):
    message = results["divisibility_error"]
    assert "block_0/attn/key/bias" in message and "(2, 16)" in message
    assert "kv_heads" in message and "tensor=8" in message
