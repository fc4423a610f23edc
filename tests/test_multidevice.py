"""Sharded training on 8 fake CPU devices equals the 1-device run, and shards what the rules say:
the parameters, and for each optimizer the state that mirrors them.

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
OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
# Parameter-shaped state leaves per parameter: Adam's mu and nu; Lion's and SGD's momentum;
# Adafactor's momentum and its second moments v, except where those are factored (below).
STATE_LIKE_PARAMS = {"adamw": 2, "lion": 1, "sgd": 1, "adafactor": 2}
# Adafactor's factored statistics (a matrix of >= 128 x 128): (state field, param) -> shape.
FACTORED = {
    ("v_row", "embedding"): [128], ("v_col", "embedding"): [256],  # (vocab 256, embed 128)
    ("v_row", "block_0/mlp/up/kernel"): [128], ("v_col", "block_0/mlp/up/kernel"): [512],
    ("v_row", "block_0/mlp/down/kernel"): [128], ("v_col", "block_0/mlp/down/kernel"): [512],
}
# Its exact gradient is 0 (a shift shared by all keys leaves the softmax unchanged), so what is
# computed is reduction-order noise, which Lion's sign and Adafactor's g / sqrt(g^2 + 1e-30) turn
# into whole +-lr steps whose sign depends on the mesh.
NOISE_GRADIENT = {"block_0/attn/key/bias"}
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
    assert results[mesh]["batch"]["spec"] == "P(('data', 'fsdp', 'expert'), None)"
    assert results[mesh]["batch"]["shard_rows"] == rows  # of 16


def test_indivisible_dimension_names_the_parameter(results):
    message = results["divisibility_error"]
    assert "block_0/attn/key/bias" in message and "(2, 16)" in message
    assert "kv_heads" in message and "tensor=8" in message


def test_two_adafactor_steps_match_one_device(results):
    r = results["optimizers"]["adafactor"]
    assert r["max_loss_diff"] < 1e-5, r["losses"]
    assert r["max_grad_norm_rel_diff"] < 1e-5
    diffs = {k: d for k, d in r["param_diffs"].items() if k not in NOISE_GRADIENT}
    assert len(diffs) == len(r["param_diffs"]) - len(NOISE_GRADIENT)
    assert max(diffs.values()) < 1e-5, diffs


def field(row):
    return row["state"].rsplit("/", 1)[-1]


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_is_sharded_like_its_parameter(results, name):
    """Every state leaf with its parameter's shape has its parameter's spec and shard shape."""
    rows = results["optimizers"][name]["state"]
    params = {row["param"] for row in rows}
    like = [row for row in rows if row["shape"] == row["param_placement"]["shape"]]
    factored = len({p for f, p in FACTORED}) if name == "adafactor" else 0
    assert len(like) == STATE_LIKE_PARAMS[name] * len(params) - factored
    for row in like:
        where = (row["state"], row["param"])
        assert row["spec"] == row["param_placement"]["spec"], where
        assert row["shard_shape"] == row["param_placement"]["shard_shape"], where


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_optimizer_state_is_split_over_fsdp_and_tensor(results, name):
    """Spot checks in numbers on the fsdp=4 x tensor=2 mesh: (vocab 256, embed 128) splits into
    (128, 32), (embed, mlp 512) into (32, 256), (embed, heads 4, head_dim 32) into (32, 2, 32)."""
    shards = {(field(row), row["param"]): row["shard_shape"] for row in results["optimizers"][name]["state"]}
    moment = {"adamw": "nu", "lion": "mu", "sgd": "trace", "adafactor": "ema"}[name]
    assert shards[(moment, "embedding")] == [128, 32]
    assert shards[(moment, "block_0/mlp/up/kernel")] == [32, 256]
    assert shards[(moment, "block_0/attn/query/kernel")] == [32, 2, 32]
    if name == "adafactor":  # unfactored second moments (a 3-axis kernel) split like the kernel
        assert shards[("v", "block_0/attn/query/kernel")] == [32, 2, 32]


def test_adafactor_factored_statistics_are_replicated_vectors(results):
    rows = results["optimizers"]["adafactor"]["state"]
    factored = {(field(row), row["param"]): row for row in rows
                if field(row) in ("v_row", "v_col") and row["shape"] != [1]}
    assert {key: row["shape"] for key, row in factored.items()} == FACTORED
    for key, row in factored.items():
        assert row["spec"] == "P()" and row["shard_shape"] == row["shape"], key
    # The placeholders optax keeps for the other parameters' unused fields: replicated too.
    for row in rows:
        if row["shape"] != row["param_placement"]["shape"]:
            assert row["spec"] == "P()", (row["state"], row["param"])
