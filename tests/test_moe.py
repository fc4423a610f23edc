"""Mixture-of-Experts FFNs (lmjax/model/moe.py): both dispatch paths against a per-token loop, the
dense FFN as its one-expert case, capacity dropping, the router losses in closed form, the counts,
and training through `python -m lmjax.main` on 8 fake devices (expert=4 x data=2) against 1 device.
"""

import functools
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from test_aot import needs_libtpu
from test_main import REPO, main_env, write_tiny_preset

from lmjax import aot
from lmjax.config import check, default_config
from lmjax.model import Transformer, moe, param_count
from lmjax.model.mlp import ACTIVATIONS, Mlp
from lmjax.train import metrics
from lmjax.train.step import lm_loss_sums_fn

D, B, L = 16, 2, 8


def model_cfg(**moe_keys):
    c = default_config().model
    c.update(num_layers=2, embed_dim=D, num_heads=2, num_kv_heads=2, vocab_size=64, max_len=16, mlp_dim=24)
    c.moe.update({"num_experts": 4, "experts_per_token": 2, **moe_keys})
    return c


def random_params(module, *inputs, std=0.3, seed=0):
    """Random parameters of the module's tree (traced, not compiled: an eager init compiles every
    op), biases nonzero so that a bias applied to the wrong expert or to an empty slot shows."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(std * rng.standard_normal(s.shape), s.dtype), shapes)


def init_moe(cfg, x_BxLxD):
    return random_params(moe.MoeMlp(cfg), x_BxLxD)


@functools.cache
def _compiled_apply(cfg_json: str):
    cfg = ml_collections.ConfigDict(json.loads(cfg_json))
    return jax.jit(lambda params, x: moe.MoeMlp(cfg).apply({"params": params}, x, mutable=[moe.COLLECTION]))


def apply_moe(cfg, params, x_BxLxD):
    """(output, router statistics); one compile per config for the whole module."""
    y, sown = _compiled_apply(cfg.to_json())(params, x_BxLxD)
    return np.asarray(y), {k: np.asarray(v) for k, v in moe.layer_means(sown[moe.COLLECTION]).items()}


def expert_np(cfg, p, e, x_D):
    """Expert e of the parameter tree on one token, in numpy."""
    dense = lambda name, h: h @ np.asarray(p[name]["kernel"][e]) + np.asarray(p[name]["bias"][e])  # noqa: E731
    if cfg.mlp == "swiglu":
        h = np.asarray(nn.silu(dense("gate", x_D))) * dense("up", x_D)
    else:
        h = np.asarray(ACTIVATIONS[cfg.mlp](dense("up", x_D)))
    return dense("down", h)


def reference_np(cfg, p, x_BxLxD, kept=None):
    """The MoE output token by token; `kept[(b, l, e)] = False` drops that token-expert pair."""
    out = np.zeros(x_BxLxD.shape, np.float64)
    for b in range(x_BxLxD.shape[0]):
        for l in range(x_BxLxD.shape[1]):
            x = np.asarray(x_BxLxD[b, l], np.float64)
            logits = x @ np.asarray(p["router"], np.float64)
            if cfg.moe.router == "softmax":
                scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            else:
                scores = 1 / (1 + np.exp(-logits))
            top = np.argsort(-scores, kind="stable")[: cfg.moe.experts_per_token]
            weights = scores[top] / (scores[top].sum() if cfg.moe.renormalize else 1.0)
            for e, w in zip(top, weights):
                if kept is None or kept.get((b, l, int(e)), True):
                    out[b, l] += w * expert_np(cfg, p, int(e), x)
            if cfg.moe.shared_experts:
                s = p["shared"]
                h = np.asarray(ACTIVATIONS[cfg.mlp](x @ np.asarray(s["up"]["kernel"]) + np.asarray(s["up"]["bias"])))
                out[b, l] += h @ np.asarray(s["down"]["kernel"]) + np.asarray(s["down"]["bias"])
    return out


X_BxLxD = jax.random.normal(jax.random.key(1), (B, L, D))


@pytest.mark.parametrize("dispatch, mlp", [("dropless", "gelu_tanh"), ("capacity", "swiglu")])
def test_one_expert_with_k1_equals_the_dense_ffn(dispatch, mlp):
    cfg = model_cfg(num_experts=1, experts_per_token=1, dispatch=dispatch, capacity_factor=1.0)
    cfg.mlp = mlp
    params = init_moe(cfg, X_BxLxD)
    dense = {name: {"kernel": params[name]["kernel"][0], "bias": params[name]["bias"][0]}
             for name in params if name != "router"}
    want = jax.jit(Mlp(cfg).apply)({"params": dense}, X_BxLxD)
    got, stats = apply_moe(cfg, params, X_BxLxD)
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert stats["dropped_fraction"] == 0 and stats["expert_load"].tolist() == [1.0]


DROPLESS = dict(dispatch="dropless")
CAPACITY_ROOMY = dict(dispatch="capacity", router="sigmoid", renormalize=False, shared_experts=2, capacity_factor=2.0)


@pytest.mark.parametrize("keys", [DROPLESS, CAPACITY_ROOMY], ids=["dropless_softmax", "capacity_sigmoid_shared"])
def test_moe_equals_a_per_token_reference_loop(keys):
    """Dropless; and capacity with room for every pair (factor X / k: each expert could take every
    token of the row), with a sigmoid router, raw top-k weights and shared experts."""
    cfg = model_cfg(**keys)
    params = init_moe(cfg, X_BxLxD)
    got, stats = apply_moe(cfg, params, X_BxLxD)
    np.testing.assert_allclose(got, reference_np(cfg, params, X_BxLxD), atol=1e-5)
    assert stats["dropped_fraction"] == 0
    np.testing.assert_allclose(stats["expert_load"].sum(), 1.0, rtol=1e-6)


def routed_input(first_choice, second_choice):
    """[B, L, D] tokens whose router logits (the first 4 coordinates, under an identity router)
    rank `first_choice[t]` first and `second_choice[t]` second in every row."""
    x = np.array(X_BxLxD)
    x[..., :4] = 0.0
    for t, (e1, e2) in enumerate(zip(first_choice, second_choice)):
        x[:, t, e1], x[:, t, e2] = 4.0, 2.0
    return jnp.asarray(x)


def identity_router(params):
    router = np.zeros(params["router"].shape, np.float32)
    router[np.arange(4), np.arange(4)] = 1.0
    return {**params, "router": jnp.asarray(router)}


def test_capacity_drops_exactly_the_overflow_first_choices_first():
    """C = ceil(k * 8 tokens * 0.5 / 4 experts) = 2 slots per expert. First choices fill slots in
    token order, then second choices: expert 0 keeps tokens 0 and 1 (first choices) and drops 2,
    3, 4; expert 1 takes token 5 (first), then token 0's second choice, and is full; expert 2 takes
    token 6 and token 7 (first choices) and drops every second choice; expert 3 takes the second
    choices of tokens 1 and 2."""
    first = [0, 0, 0, 0, 0, 1, 2, 2]
    second = [1, 3, 3, 1, 2, 2, 0, 3]
    kept_pairs = {(0, 0), (1, 0), (5, 1), (0, 1), (6, 2), (7, 2), (1, 3), (2, 3)}
    cfg = model_cfg(dispatch="capacity", capacity_factor=0.5)
    assert moe.capacity(cfg.moe, 8) == 2
    x = routed_input(first, second)
    params = identity_router(init_moe(cfg, x))
    got, stats = apply_moe(cfg, params, x)
    kept = {(b, t, e): (t, e) in kept_pairs for b in range(B) for t in range(L) for e in range(4)}
    np.testing.assert_allclose(got, reference_np(cfg, params, x, kept), atol=1e-5)
    assert stats["dropped_fraction"] == pytest.approx(1 - len(kept_pairs) / 16)
    np.testing.assert_allclose(stats["expert_load"], [6 / 16, 3 / 16, 4 / 16, 3 / 16])
    # Token 4 lost both its experts: its output is exactly 0.
    assert np.all(got[:, 4] == 0)
    # The dropless path keeps everything.
    dropless, _ = apply_moe(model_cfg(**DROPLESS), params, x)
    np.testing.assert_allclose(dropless, reference_np(cfg, params, x), atol=1e-5)


def test_router_losses_have_their_closed_forms():
    cfg = model_cfg(**DROPLESS)
    params = init_moe(cfg, X_BxLxD)
    params["router"] = jnp.zeros_like(params["router"])  # a uniform router
    _, stats = apply_moe(cfg, params, X_BxLxD)
    # X * sum_i f_i * (1 / X) = sum_i f_i = 1, whatever the ties made f; log Z = log X.
    assert stats["load_balance_loss"] == pytest.approx(1.0, abs=1e-6)
    assert stats["router_z_loss"] == pytest.approx(np.log(4) ** 2, rel=1e-6)
    # By hand, top-1 of 2 experts: f = (3/4, 1/4), p = (0.65, 0.35): 2 * (0.4875 + 0.0875).
    scores = jnp.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    loss, load = moe.load_balance_loss(scores, jnp.array([[0], [0], [0], [1]]))
    assert float(loss) == pytest.approx(1.15, rel=1e-6)
    np.testing.assert_allclose(load, [0.75, 0.25])


def test_router_losses_enter_the_training_objective_with_their_weights():
    c = default_config()
    c.model = model_cfg(dispatch="capacity", load_balance_loss=0.5, router_z_loss=0.25)
    c.model.num_layers = 1
    c.data.seq_len = L
    model = Transformer(c.model)
    tokens = jax.random.randint(jax.random.key(3), (B, L + 1), 0, 64)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((B, L)).at[0, 0].set(0.0)}
    params = random_params(model, batch["inputs"], std=0.1)
    objective, sums = jax.jit(lm_loss_sums_fn(c, model))(params, batch, jax.random.key(0), 0)
    w = float(sums["weight_sum"])
    balance, z = float(sums["moe_load_balance_loss_sum"]) / w, float(sums["moe_router_z_loss_sum"]) / w
    assert w == B * L - 1 and balance > 1.0 and z > 0
    assert float(objective) == pytest.approx(float(sums["loss_sum"]) + w * (0.5 * balance + 0.25 * z), rel=1e-6)
    assert sums["moe_expert_load_sum"].shape == (4,)


@pytest.mark.parametrize("mlp, use_bias, shared", [("gelu_tanh", True, 0), ("swiglu", False, 1)])
def test_param_count_is_the_tree_size_and_active_counts_k_experts(mlp, use_bias, shared):
    cfg = model_cfg(shared_experts=shared, expert_dim=12)
    cfg.update(mlp=mlp, use_bias=use_bias)
    tree = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    assert param_count(cfg) == sum(x.size for x in jax.tree.leaves(nn.unbox(tree)))
    experts = tree["block_0"]["moe"]
    for name in ("up", "down") + (("gate",) if mlp == "swiglu" else ()):
        assert experts[name]["kernel"].names[0] == "expert" and experts[name]["kernel"].value.shape[0] == 4
        assert not use_bias or experts[name]["bias"].names == ("expert", "embed" if name == "down" else "mlp")
    per_expert = (3 if mlp == "swiglu" else 2) * D * 12 + use_bias * (12 + D)  # gelu: up + down (+ biases)
    assert param_count(cfg) - param_count(cfg, active=True) == cfg.num_layers * (4 - 2) * per_expert


def test_bad_moe_config_names_the_key():
    c = default_config()
    c.model.moe.update(num_experts=4, experts_per_token=5)
    with pytest.raises(ValueError, match="config.model.moe.experts_per_token=5"):
        check(c)
    c.model.moe.update(experts_per_token=2, dispatch="sorted")
    with pytest.raises(ValueError, match="config.model.moe.dispatch='sorted'.*dropless, capacity"):
        check(c)


# --- 8 fake devices (expert=4 x data=2) against 1, and training through lmjax.main on them -------

STEPS = 3
MOE_OVERRIDES = {"model.num_layers": 1, "model.moe.num_experts": 4, "model.moe.dispatch": "capacity",
                 "model.moe.shared_experts": 1, "train.steps": STEPS, "train.batch_size": 8,
                 "eval.num_samples": 0, "eval.steps": 0}


@pytest.fixture(scope="module", autouse=True)
def eight_devices_run(tmp_path_factory):
    """tests/moe_multidevice_check.py in one subprocess (the fake device count must be set before
    JAX is imported), started before this module's first test so that it runs beside the others."""
    directory = str(tmp_path_factory.mktemp("moe"))
    preset = write_tiny_preset(directory, steps=STEPS, eval_every=STEPS)
    out, workdir = os.path.join(directory, "result.json"), os.path.join(directory, "run")
    env = main_env()  # with a persistent compilation cache: lmjax.main reuses the programs compiled before it
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # LLVM -O0: half the compile time, as test_multidevice
    proc = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "moe_multidevice_check.py"), preset, workdir,
         json.dumps(MOE_OVERRIDES), out],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    yield proc, out, workdir
    if proc.poll() is None:
        proc.kill()
        proc.communicate()


@pytest.fixture(scope="module")
def eight_devices(eight_devices_run):
    """(the check's JSON, the metrics records of its lmjax.main run, its stdout)."""
    proc, out, workdir = eight_devices_run
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    with open(out) as f:
        return json.load(f), metrics.read_metrics(workdir), stdout


def test_eight_devices_expert4_data2_train_as_one_device(eight_devices):
    r, _, _ = eight_devices
    np.testing.assert_allclose(r["losses_8"], r["losses_1"], atol=1e-5)
    np.testing.assert_allclose(r["grad_norms_8"], r["grad_norms_1"], rtol=1e-5)
    assert r["max_param_diff"] < 1e-5
    # 4 experts over the expert axis; the batch rows over data x expert.
    assert r["expert_kernel_shape"][0] == 4 and r["expert_kernel_shard_shape"][0] == 1
    assert r["batch_spec"] == "P(('data', 'fsdp', 'expert'), None)"


def test_moe_config_trains_through_main_on_the_expert_mesh(eight_devices):
    r, records, stdout = eight_devices
    assert r["main_exit_code"] == 0 and "8 cpu device(s)" in stdout
    assert [x["step"] for x in records] == list(range(1, STEPS + 1))
    for x in records:
        assert np.isfinite(x["loss"]) and x["moe_load_balance_loss"] >= 1.0 - 1e-6 and x["moe_router_z_loss"] > 0
        assert 0 <= x["moe_dropped_fraction"] < 1 and len(x["moe_expert_load"]) == 4
        assert sum(x["moe_expert_load"]) == pytest.approx(1.0, rel=1e-5)


@needs_libtpu
def test_moe_config_compiles_ahead_of_time_for_a_tpu_slice():
    """expert=4 x data=2 on a v5e-8: the capacity path fits, and its expert weights are split 4 ways."""
    c = default_config()
    c.model = model_cfg(dispatch="capacity", shared_experts=1)
    c.model.num_layers = 1
    c.data.seq_len = 16
    c.train.batch_size = 8
    c.mesh.update(expert=4, data=2)
    report = aot.check_fits(c, "v5e-8")
    assert report.fits, report.message
    assert report.mesh == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
    assert report.collectives["all-to-all"] + report.collectives["all-gather"] > 0
