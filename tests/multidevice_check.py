"""Runs the tiny model for 3 train steps on 1 device and on several 8-device meshes; prints JSON.

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


def run(sizes: dict) -> dict:
    c = tiny_config()
    c.mesh.update(sizes)
    devices = jax.devices()[: int(np.prod(list(sizes.values())))]
    mesh = sharding.make_mesh(c.mesh, devices)
    rules = sharding.rules(c.mesh)
    model = Transformer(c.model)
    state, shardings = train.create_train_state(c, model, mesh)
    step = train.make_train_step(c, model, mesh, shardings)
    losses, grad_norms, batch_info = [], [], None
    for b in batches(c):
        batch = sharding.shard_batch(b, mesh, rules)
        batch_info = {
            "spec": str(batch["inputs"].sharding.spec),
            "shard_rows": batch["inputs"].addressable_shards[0].data.shape[0],
        }
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        grad_norms.append(float(metrics["grad_norm"]))
    flat = {
        jax.tree_util.keystr(path, simple=True, separator="/"): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)
    }
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
        "losses": losses,
        "grad_norms": grad_norms,
        "params": {k: np.asarray(v) for k, v in flat.items()},
        "batch": batch_info,
        "inspected": inspected,
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
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
