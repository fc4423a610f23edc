"""Schedules, loss and the train/eval steps on one device (optimizers: test_optimizer.py; meshes:
test_multidevice.py)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax import aot, sharding, train
from lmjax.config import default_config
from lmjax.model import Transformer


def tiny_config(**model):
    c = default_config()
    c.model.update(num_layers=2, embed_dim=64, num_heads=4, num_kv_heads=2, vocab_size=128, max_len=16)
    c.model.update(model)
    c.data.seq_len = 16
    c.train.update(batch_size=8, steps=10)
    c.optim.update(schedule="constant", warmup_steps=0, lr=1e-4)
    return c


def random_batch(c, seed=0, rows=None):
    rng = np.random.default_rng(seed)
    rows = rows or c.train.batch_size
    tokens = rng.integers(0, c.model.vocab_size, (rows, c.data.seq_len + 1), dtype=np.int32)
    # Uneven real-token counts per row, so a mean of per-microbatch means would be wrong.
    weights = (rng.random((rows, c.data.seq_len)) < np.linspace(0.2, 1.0, rows)[:, None]).astype(np.float32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


# --- schedules ---------------------------------------------------------------------------------


def schedule(name, **kw):
    o = default_config().optim
    o.update(lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule=name, **kw)
    return train.make_schedule(o, total_steps=110)


@pytest.mark.parametrize("name", ["cosine", "linear", "constant", "wsd"])
def test_schedules_warm_up_linearly_to_the_peak(name):
    s = schedule(name)
    assert [float(s(t)) for t in (0, 5, 10)] == pytest.approx([0.0, 0.5, 1.0])


def test_cosine_hits_midpoint_and_floor():
    s = schedule("cosine")
    assert float(s(60)) == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert float(s(110)) == pytest.approx(0.1)
    assert float(s(500)) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    assert float(schedule("linear")(60)) == pytest.approx(0.55)
    assert float(schedule("linear")(110)) == pytest.approx(0.1)
    assert float(schedule("constant")(110)) == pytest.approx(1.0)


def test_wsd_holds_the_peak_then_decays_over_the_last_fraction():
    s = schedule("wsd", decay_fraction=0.2)  # 22 decay steps: stable until step 88
    assert float(s(50)) == pytest.approx(1.0)
    assert float(s(88)) == pytest.approx(1.0)
    assert float(s(99)) == pytest.approx(0.55)
    assert float(s(110)) == pytest.approx(0.1)


def test_unknown_schedule_names_the_key():
    with pytest.raises(ValueError, match="config.optim.schedule"):
        schedule("nope")


# --- loss --------------------------------------------------------------------------------------


def test_cross_entropy_sums_respect_weights():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3))
    weights = np.array([[1, 0, 1], [0.5, 1, 0]], np.float32)
    loss_sum, weight_sum, z_sum = train.cross_entropy_sums(
        jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights)
    )
    log_z = np.log(np.exp(logits).sum(-1))
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    assert float(loss_sum) == pytest.approx(float((nll * weights).sum()), rel=1e-6)
    assert float(weight_sum) == 3.5
    assert float(z_sum) == pytest.approx(float((log_z**2 * weights).sum()), rel=1e-6)
    assert float(train.safe_mean(jnp.float32(3.0), jnp.float32(0.0))) == 0.0  # all padding: 0, not NaN


# --- steps -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def setup():
    c = tiny_config()
    c.train.z_loss = 1e-4
    mesh = sharding.make_mesh(c.mesh)
    model = Transformer(c.model)
    state, shardings = train.create_train_state(c, model, mesh)
    step = train.make_train_step(c, model, mesh, shardings)  # compiled once, shared by the tests
    return c, mesh, model, state, shardings, step


def copy(tree):
    return jax.tree.map(jnp.copy, tree)


def test_microbatches_equal_one_big_batch(setup):
    c, mesh, model, state, shardings, step = setup
    batch = sharding.shard_batch(random_batch(c), mesh, sharding.rules(c.mesh))
    c_k = c.copy_and_resolve_references()
    c_k.train.microbatches = 4
    step_k = train.make_train_step(c_k, model, mesh, shardings)
    state_1, m_1 = jax.device_get(step(copy(state), batch))
    state_k, m_k = jax.device_get(step_k(copy(state), batch))
    params_1, params_k = state_1.params, state_k.params
    for key in ("loss", "grad_norm", "update_norm", "weight_sum", "z_loss"):
        assert m_k[key] == pytest.approx(m_1[key], rel=1e-5), key
    diff = max(jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params_1, params_k)))
    assert diff < 1e-5
    assert bool(m_1["is_finite"])


def test_step_metrics_and_eval_agree(setup):
    c, mesh, model, state, shardings, step = setup
    batch = sharding.shard_batch(random_batch(c, seed=1), mesh, sharding.rules(c.mesh))
    eval_sums = train.make_eval_step(c, model, mesh, shardings)(state.params, batch)
    new_state, metrics = step(copy(state), batch)
    assert set(metrics) == set(train.METRICS)
    eval_loss = float(eval_sums["loss_sum"] / eval_sums["weight_sum"])
    assert float(metrics["loss"]) == pytest.approx(eval_loss, rel=1e-5)
    assert float(metrics["weight_sum"]) == float(np.asarray(batch["weights"]).sum())
    assert math.log(c.model.vocab_size) == pytest.approx(float(metrics["loss"]), rel=0.05)
    assert float(metrics["lr"]) == pytest.approx(1e-4)
    assert int(new_state.step) == 1
    assert float(metrics["z_loss"]) > 0


def test_non_finite_loss_is_flagged(setup):
    c, mesh, model, state, shardings, step = setup
    batch = sharding.shard_batch(random_batch(c), mesh, sharding.rules(c.mesh))
    params = copy(state.params)
    params["final_norm"]["scale"] = params["final_norm"]["scale"].at[0].set(jnp.inf)
    _, metrics = step(copy(state).replace(params=params), batch)
    assert not bool(metrics["is_finite"])


def lowered_train_step(c) -> str:
    """The train step lowered on abstract inputs, as `lmjax.aot` does: no concrete arrays, no local
    devices in the path; the batch has the fields `c.data.packing` yields."""
    mesh = sharding.make_mesh(c.mesh)
    model = Transformer(c.model)
    abstract, shardings = train.abstract_train_state(c, model, mesh)
    return train.make_train_step(c, model, mesh, shardings).lower(abstract, aot.abstract_batch(c, mesh)).as_text()


def test_train_step_lowers_on_abstract_inputs():
    assert "sharding_constraint" in lowered_train_step(tiny_config())  # the model's logical constraints bound


def test_concat_batches_take_the_causal_path_without_a_dense_mask():
    """Rows without segment ids (concat packing) never build the [B, 1, L, L] mask that segments need."""
    c = tiny_config()
    dense_mask = f"tensor<{c.train.batch_size}x1x{c.data.seq_len}x{c.data.seq_len}xi1>"
    assert dense_mask not in lowered_train_step(c)
    c.data.packing = "segments"
    assert dense_mask in lowered_train_step(c)
