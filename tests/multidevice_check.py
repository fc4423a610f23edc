"""Runs the tiny model for 3 train steps on 1 device and on several 8-device meshes, and each
optimizer for 2 steps on 1 device and on an fsdp x tensor mesh; prints JSON.

Run by tests/test_multidevice.py in a subprocess, because the fake device count must be set
before JAX is imported. All meshes share one process so JAX and the model are imported once.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import json  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lmjax import sharding, train  # noqa: E402
from lmjax.config import default_config  # noqa: E402
from lmjax.model import Transformer  # noqa: E402
from lmjax.train.optimizer import OPTIMIZERS  # noqa: E402

MESHES = {
    "single": dict(data=1, fsdp=1, tensor=1),
    "data8": dict(data=8, fsdp=1, tensor=1),
    "fsdp8": dict(data=1, fsdp=8, tensor=1),
    "tensor2_data4": dict(data=4, fsdp=1, tensor=2),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
}
# Arrays whose shards the test inspects: path -> logical names of the parameter.
INSPECT = {
    "embedding": ("vocab", "embed"),
    "block_0/attn/query/kernel": ("embed", "heads", "head_dim"),
    "block_0/attn/key/kernel": ("embed", "kv_heads", "head_dim"),
    "block_0/mlp/up/kernel": ("embed", "mlp"),
    "block_0/mlp/down/kernel": ("mlp", "embed"),
}

# Each optimizer on fsdp x tensor, so its state's matrices are split along both axes.
OPTIMIZER_MESH = dict(data=1, fsdp=4, tensor=2)


def tiny_config():
    c = default_config()
    c.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, vocab_size=128, max_len=16)
    c.data.seq_len = 16
    c.train.update(batch_size=16, steps=3)
    # lr 1e-4: Adam turns a gradient element near 0 (e.g. key biases, whose exact gradient is 0)
    # into an update of up to ~lr whose sign is reduction-order noise; at 1e-3 one element of
    # 2048 moved 3e-5 between meshes. grad_norm is compared too, since Adam hides a scale error.
    c.optim.update(schedule="constant", warmup_steps=0, lr=1e-4)
    return c


def batches(c, n=3):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        tokens = rng.integers(0, c.model.vocab_size, (c.train.batch_size, c.data.seq_len + 1), dtype=np.int32)
        weights = (rng.random((c.train.batch_size, c.data.seq_len)) > 0.1).astype(np.float32)
        out.append({"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights})
    return out


def train_on(c, sizes: dict, steps: int, start=None) -> dict:
    """The state after `steps` steps of config `c` on a mesh of `sizes` (from `start`, a host copy
    of a train state, if given), the metrics on the way, and the start state as a host copy."""
    c = c.copy_and_resolve_references()
    c.mesh.update(sizes)
    devices = jax.devices()[: int(np.prod(list(sizes.values())))]
    mesh = sharding.make_mesh(c.mesh, devices)
    rules = sharding.rules(c.mesh)
    model = Transformer(c.model)
    if start is None:
        state, shardings = train.create_train_state(c, model, mesh)
        start = jax.device_get(state)
    else:  # saves compiling the initializer again
        _, shardings = train.abstract_train_state(c, model, mesh)
        state = jax.device_put(start, shardings)
    step = train.make_train_step(c, model, mesh, shardings)
    losses, grad_norms, batch_info = [], [], None
    for b in batches(c, steps):
        batch = sharding.shard_batch(b, mesh, rules)
        batch_info = {
            "spec": str(batch["inputs"].sharding.spec),
            "shard_rows": batch["inputs"].addressable_shards[0].data.shape[0],
        }
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    return dict(state=state, losses=losses, grad_norms=grad_norms, batch=batch_info, mesh=mesh, rules=rules,
                start=start)


def flatten(tree) -> dict:
    return {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def run(sizes: dict) -> dict:
    r = train_on(tiny_config(), sizes, steps=3)
    mesh, rules = r["mesh"], r["rules"]
    flat = flatten(r["state"].params)
    inspected = {}
    for path, names in INSPECT.items():
        arr = flat[path]
        expected = sharding.logical_sharding(mesh, rules, names).spec
        inspected[path] = {
            "spec": str(arr.sharding.spec),
            "expected_spec": str(expected),
            "shape": list(arr.shape),
            "shard_shape": list(arr.addressable_shards[0].data.shape),
            "expected_shard_shape": [
                d // sharding.axes_size(mesh, a) for d, a in zip(arr.shape, tuple(expected) + (None,) * 3)
            ],
        }
    return {
        "losses": r["losses"],
        "grad_norms": r["grad_norms"],
        "params": {k: np.asarray(v) for k, v in flat.items()},
        "batch": r["batch"],
        "inspected": inspected,
    }


def placement(arr) -> dict:
    return {
        "spec": str(arr.sharding.spec),
        "shape": list(arr.shape),
        "shard_shape": list(arr.addressable_shards[0].data.shape),
    }


def optimizer_state_placement(state) -> list:
    """Every leaf of the optimizer state's param-shaped subtrees (Adam's mu and nu, a momentum,
    Adafactor's v, v_row and v_col), found by tree structure rather than by the path matching that
    `train.abstract_train_state` uses, next to its parameter's placement."""
    params = flatten(state.params)
    treedef = jax.tree.structure(state.params)
    like_params = lambda x: jax.tree.structure(x) == treedef
    rows = []
    for path, subtree in jax.tree_util.tree_leaves_with_path(state.opt_state, is_leaf=like_params):
        if not like_params(subtree):
            continue  # step counts, empty states
        for param_path, leaf in flatten(subtree).items():
            rows.append({
                "state": jax.tree_util.keystr(path, simple=True, separator="/"),
                "param": param_path,
                **placement(leaf),
                "param_placement": placement(params[param_path]),
            })
    return rows


def optimizer_run(name: str) -> dict:
    """The state of optimizer `name` created on OPTIMIZER_MESH, with one block of width 128 over a
    vocabulary of 256, so that Adafactor factors the embedding and MLP matrices. Adafactor, whose
    factored statistics reduce over sharded dimensions, also takes 2 steps there and on 1 device
    (the others' updates are elementwise; adamw's mesh equality is `run`'s)."""
    c = tiny_config()
    c.model.update(num_layers=1, embed_dim=128, vocab_size=256)
    c.optim.name = name
    if name != "adafactor":
        c.mesh.update(OPTIMIZER_MESH)
        state, _ = train.create_train_state(c, Transformer(c.model), sharding.make_mesh(c.mesh, jax.devices()[:8]))
        return {"state": optimizer_state_placement(state)}
    eight = train_on(c, OPTIMIZER_MESH, steps=2)
    one = train_on(c, MESHES["single"], steps=2, start=eight["start"])
    params_1, params_8 = (flatten(jax.device_get(r["state"].params)) for r in (one, eight))
    return {
        "losses": eight["losses"],
        "max_loss_diff": float(np.max(np.abs(np.subtract(eight["losses"], one["losses"])))),
        "max_grad_norm_rel_diff": float(
            np.max(np.abs(np.subtract(eight["grad_norms"], one["grad_norms"])) / one["grad_norms"])
        ),
        "param_diffs": {k: float(np.max(np.abs(params_8[k] - params_1[k]))) for k in params_1},
        "state": optimizer_state_placement(eight["state"]),
    }


def divisibility_error() -> str:
    c = tiny_config()
    c.mesh.update(data=1, fsdp=1, tensor=8)  # num_kv_heads=2 cannot split 8 ways
    mesh = sharding.make_mesh(c.mesh)
    try:
        train.create_train_state(c, Transformer(c.model), mesh)
    except ValueError as e:
        return str(e)
    return ""


def main() -> None:
    assert len(jax.devices()) == 8, jax.devices()
    runs = {name: run(sizes) for name, sizes in MESHES.items()}
    reference = runs["single"]
    results = {}
    for name, r in runs.items():
        r["max_loss_diff"] = float(np.max(np.abs(np.subtract(r["losses"], reference["losses"]))))
        r["max_grad_norm_rel_diff"] = float(
            np.max(np.abs(np.subtract(r["grad_norms"], reference["grad_norms"])) / reference["grad_norms"])
        )
        r["max_param_diff"] = max(
            float(np.max(np.abs(r["params"][k] - reference["params"][k]))) for k in reference["params"]
        )
        results[name] = {k: v for k, v in r.items() if k != "params"}
    results["divisibility_error"] = divisibility_error()
    results["optimizers"] = {name: optimizer_run(name) for name in OPTIMIZERS}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
