"""Scheduled sampling: the schedules, which inputs are replaced, and probability 0 is teacher forcing,
bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import V, init
from test_train import random_batch, tiny_config

from lmjax import config as config_lib
from lmjax import sharding, train
from lmjax.model import Transformer
from lmjax.train import scheduled_sampling


def train_cfg(name, k=100.0, cap=1.0):
    t = config_lib.default_config().train
    t.update(scheduled_sampling=name, scheduled_sampling_k=k, scheduled_sampling_max=cap)
    return t


def test_schedules_follow_their_formulas_and_the_cap():
    p = lambda t, step: float(scheduled_sampling.replace_probability(t, step))
    assert p(train_cfg("constant", cap=0.3), 0) == pytest.approx(0.3)
    assert [p(train_cfg("linear", k=100.0), s) for s in (0, 50, 100, 400)] == pytest.approx([0, 0.5, 1, 1])
    assert p(train_cfg("exponential", k=0.99), 100) == pytest.approx(1 - 0.99**100, rel=1e-5)
    assert p(train_cfg("inverse_sigmoid", k=10.0), 20) == pytest.approx(1 - 10 / (10 + np.exp(2.0)), rel=1e-5)
    assert p(train_cfg("linear", k=100.0, cap=0.25), 90) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="config.train.scheduled_sampling='none' has no probability"):
        scheduled_sampling.replace_probability(train_cfg("none"), 0)


def test_only_inputs_that_follow_a_weighted_target_take_the_models_guess():
    inputs = jnp.array([[10, 11, 12, 13, 14]])
    guesses = jnp.array([[21, 22, 23, 24, 25]])  # guesses[t] is the guess of inputs[t + 1]
    weights = jnp.array([[1, 0, 1, 1, 1]])  # input 2 follows an unweighted target (a boundary): kept
    key, mix = jax.random.key(0), jax.jit(scheduled_sampling.mix_inputs)
    assert mix(inputs, guesses, weights, 1.0, key).tolist() == [[10, 21, 12, 23, 24]]
    assert mix(inputs, guesses, weights, 0.0, key).tolist() == inputs.tolist()
    big = jnp.ones((64, 64), jnp.int32)
    half = mix(big, big * 2, big, 0.5, key)
    assert 0.4 < float(jnp.mean(half[:, 1:] == 2)) < 0.6 and bool(jnp.all(half[:, 0] == 1))


def one_step(c, params, batch):
    """One train step from `params` (no init compile: the state is built around given parameters)."""
    mesh = sharding.make_mesh(c.mesh)
    model = Transformer(c.model)
    _, shardings = train.abstract_train_state(c, model, mesh)
    tx, _ = train.make_tx(c, train.abstract_params(c, model))
    params = jax.tree.map(jnp.copy, params)  # the step donates its state
    state = train.TrainState(jnp.int32(0), params, tx.init(params), jax.random.PRNGKey(0))
    step = train.make_train_step(c, model, mesh, shardings)
    return jax.device_get(step(state, sharding.shard_batch(batch, mesh, sharding.rules(c.mesh))))


def test_probability_zero_is_bit_identical_to_teacher_forcing():
    c = tiny_config(num_layers=1, embed_dim=32, vocab_size=V)
    c.train.batch_size = 4
    c.optim.update(name="sgd", clip=0.0)  # the smallest step to compile; the loss path is the same
    params, batch = init(c.model), random_batch(c)
    forced_state, forced = one_step(c, params, batch)
    c.train.update(scheduled_sampling="constant", scheduled_sampling_max=0.0)
    zero_state, zero = one_step(c, params, batch)
    for key in forced:
        assert np.array_equal(zero[key], forced[key]), key
    for a, b in zip(jax.tree.leaves(zero_state.params), jax.tree.leaves(forced_state.params)):
        assert np.array_equal(a, b)
    assert not np.array_equal(zero_state.params["embedding"], params["embedding"])  # the step did update


def test_a_k_that_does_not_fit_the_schedule_is_refused():
    c = config_lib.default_config()
    c.train.update(scheduled_sampling="exponential", scheduled_sampling_k=1000.0)
    with pytest.raises(ValueError, match=r"scheduled_sampling_k=1000.0 must be in \(0, 1\) for .*'exponential'"):
        config_lib.check(c)
    c.train.scheduled_sampling_k = 0.999
    config_lib.check(c)
    c.train.update(scheduled_sampling="constant", scheduled_sampling_max=1.5)
    with pytest.raises(ValueError, match=r"scheduled_sampling_max=1.5 must be in \[0, 1\]"):
        config_lib.check(c)
