"""Distillation: the objective against a hand computation, zero KL when the teacher is the student, and
alpha 0 is the plain next-token loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import FAST_COMPILE, forward, init
from test_train import random_batch, tiny_config

from lmjax import config as config_lib
from lmjax.model import Transformer
from lmjax.train import distill
from lmjax.train import step as step_lib


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def setting():
    c = tiny_config(num_layers=1, embed_dim=32)
    c.train.batch_size = 4
    teacher_cfg = tiny_config(num_layers=2, embed_dim=48).model  # another shape, the same vocabulary
    batch = jax.tree.map(jnp.asarray, random_batch(c))
    return c, init(c.model), Transformer(teacher_cfg), init(teacher_cfg), batch


def loss_fn(c, teacher):
    """The distillation objective, jitted once per teacher shape: the teacher's params are an argument."""
    def objective(params, teacher_params, batch):
        fn = distill.distill_loss_sums_fn(c, Transformer(c.model), teacher, teacher_params)
        return fn(params, batch, jax.random.key(0), jnp.int32(0))

    return jax.jit(objective, compiler_options=FAST_COMPILE)


def test_objective_matches_a_hand_computation(setting):
    c, params, teacher, teacher_params, batch = setting
    c.distill.update(temperature=2.0, alpha=0.3, reverse_kl=0.25)
    objective, sums = loss_fn(c, teacher)(params, teacher_params, batch)

    s = np.asarray(forward(c.model, params, batch["inputs"]), np.float64)
    t = np.asarray(forward(teacher.cfg, teacher_params, batch["inputs"]), np.float64)
    w, targets = np.asarray(batch["weights"], np.float64), np.asarray(batch["targets"])
    ce = -np.take_along_axis(log_softmax(s), targets[..., None], -1)[..., 0]
    log_s, log_t = log_softmax(s / 2.0), log_softmax(t / 2.0)
    forward_kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)
    reverse_kl = (np.exp(log_s) * (log_s - log_t)).sum(-1)
    kl = ((0.75 * forward_kl + 0.25 * reverse_kl) * w).sum()
    assert float(sums["kl_sum"]) == pytest.approx(kl, rel=1e-4)
    assert float(sums["loss_sum"]) == pytest.approx((ce * w).sum(), rel=1e-5)
    assert float(objective) == pytest.approx(0.7 * (ce * w).sum() + 0.3 * 4.0 * kl, rel=1e-5)


def test_teacher_as_student_has_zero_kl(setting):
    c, params, _, _, batch = setting
    c.distill.update(temperature=3.0, alpha=1.0, reverse_kl=0.5)
    as_student = loss_fn(c, Transformer(c.model))
    assert abs(float(as_student(params, params, batch)[1]["kl_sum"])) < 1e-5
    other = jax.tree.map(lambda x: x * 1.5, params)
    assert float(as_student(params, other, batch)[1]["kl_sum"]) > 1e-2


def test_alpha_zero_is_the_plain_loss(setting):
    c, params, teacher, teacher_params, batch = setting
    c.distill.update(temperature=2.0, alpha=0.0, reverse_kl=0.0)
    key, step = jax.random.key(0), jnp.int32(0)
    plain = step_lib.lm_loss_sums_fn(c, Transformer(c.model))
    distilled = distill.distill_loss_sums_fn(c, Transformer(c.model), teacher, teacher_params)
    both = jax.jit(lambda *args: (jax.value_and_grad(plain, has_aux=True)(*args),
                                  jax.value_and_grad(distilled, has_aux=True)(*args)), compiler_options=FAST_COMPILE)
    ((want, _), want_grads), ((got, _), got_grads) = both(params, batch, key, step)
    assert got == want
    for a, b in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)


def test_bad_distill_settings_are_refused():
    c = config_lib.default_config()
    for key, value, message in (("temperature", 0.0, "temperature=0.0 must be > 0"),
                                ("alpha", 1.5, r"alpha=1.5 must be in \[0, 1\]")):
        bad = config_lib.default_config()
        bad.distill[key] = value
        with pytest.raises(ValueError, match=message):
            distill.check(bad)
    c.distill.teacher_workdir, c.train.early_exit_layers = "/tmp/teacher", (1,)
    with pytest.raises(ValueError, match="cannot be combined"):
        distill.check(c)
