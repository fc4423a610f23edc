"""The optimizers against hand computations: decoupled, lr-scaled, masked decay and each direction.

Every optimizer is `p <- p - lr_t * (direction + weight_decay * p)` on the decayed parameters and
`p <- p - lr_t * direction` on the rest. The references below follow the papers in numpy
(float64), independently of optax; sharded optimizer state is checked in test_multidevice.py.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lmjax import train
from lmjax.config import default_config
from lmjax.model import Transformer
from lmjax.train.optimizer import OPTIMIZERS

LAYERS = ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/up", "mlp/down")
KERNELS = {f"block_{i}/{layer}/kernel" for i in (0, 1) for layer in LAYERS}


def tiny_config(name="adamw", model=None, **optim):
    """Two blocks, embed 128 and vocab 256, so Adafactor factors the embedding and MLP matrices."""
    c = default_config()
    c.model.update(num_layers=2, embed_dim=128, num_heads=4, num_kv_heads=2, vocab_size=256, max_len=16)
    c.model.update(model or {})
    c.data.seq_len = 16
    c.train.steps = 10
    c.optim.update(name=name, schedule="constant", warmup_steps=0, lr=1e-4, weight_decay=0.1, clip=0.0)
    c.optim.update(optim)
    return c


def path_names(tree, predicate=bool):
    return {
        jax.tree_util.keystr(path, simple=True, separator="/")
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
        if predicate(leaf)
    }


def flatten(tree):
    return {jax.tree_util.keystr(path, simple=True, separator="/"): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def random_like(abstract, seed):
    """Standard normal float32 arrays shaped like `abstract`."""
    leaves, treedef = jax.tree.flatten(abstract)
    rng = np.random.default_rng(seed)
    return jax.tree.unflatten(treedef, [rng.normal(size=x.shape).astype(np.float32) for x in leaves])


def run(tx, params, grads_per_step):
    """Applies `tx` once per gradient tree; returns the params (numpy) after each step."""
    update = jax.jit(tx.update)
    state, p, history = tx.init(params), params, []
    for grads in grads_per_step:
        updates, state = update(grads, state, p)
        p = optax.apply_updates(p, updates)
        history.append(jax.tree.map(np.asarray, p))
    return history, state


# --- the decay mask ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_params():
    c = tiny_config()
    return train.abstract_params(c, Transformer(c.model))


@pytest.mark.parametrize("decay_embeddings", [True, False])
def test_weight_decay_mask_is_exactly_matrices(model_params, decay_embeddings):
    mask = train.decay_mask(model_params, decay_embeddings)
    embeddings = {"embedding", "pos_embedding"} if decay_embeddings else set()
    assert path_names(mask) == KERNELS | embeddings


def test_weight_decay_mask_ignores_the_scanned_layers_axis():
    c = tiny_config(model=dict(scan_layers=True))
    boxed = train.abstract_params(c, Transformer(c.model))
    decayed = path_names(train.decay_mask(boxed, True))
    assert "blocks/attn/query/bias" not in decayed  # (layers, heads, head_dim): still a bias
    assert "blocks/mlp_norm/scale" not in decayed
    assert {"blocks/attn/query/kernel", "blocks/mlp/down/kernel", "embedding"} <= decayed


def test_unknown_optimizer_names_the_key():
    c = tiny_config("nope")
    with pytest.raises(ValueError, match="config.optim.name='nope'"):
        train.make_tx(c, {})


# --- decay alone: zero gradients ---------------------------------------------------------------


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_zero_gradients_shrink_decayed_weights_by_one_minus_lr_decay_per_step(model_params, name):
    """With lr 1e-4 and decay 0.1, ten steps keep (1 - 1e-5)^10 of a decayed weight, whatever the
    optimizer (Adafactor once kept 0.9^10: its decay ignored the learning rate), and leave the
    biases and norm parameters exactly as they were."""
    k, lr, wd = 10, 1e-4, 0.1
    c = tiny_config(name, lr=lr, weight_decay=wd)
    tx, _ = train.make_tx(c, model_params)
    params = random_like(nn.unbox(model_params), seed=0)
    zeros = jax.tree.map(np.zeros_like, params)
    history, state = run(tx, params, [zeros] * k)

    mask = train.decay_mask(model_params, bool(c.optim.decay_embeddings))
    factor = (1.0 - lr * wd) ** k
    decays, before, after = flatten(mask), flatten(params), flatten(history[-1])
    assert any(decays.values()) and not all(decays.values())
    for path, decayed in decays.items():
        if decayed:
            np.testing.assert_allclose(after[path], before[path] * factor, rtol=1e-6, err_msg=path)
        else:
            np.testing.assert_array_equal(after[path], before[path], err_msg=path)
    if name == "adafactor":  # the factored statistics took part too
        assert factored_paths(state) == {"embedding", "block_0/mlp/up/kernel", "block_0/mlp/down/kernel",
                                         "block_1/mlp/up/kernel", "block_1/mlp/down/kernel"}


def factored_paths(opt_state):
    """Params whose Adafactor second moments are kept as row and column statistics."""
    is_factored = lambda x: isinstance(x, optax.FactoredState)
    (factored,) = [s for s in jax.tree.leaves(opt_state, is_leaf=is_factored) if is_factored(s)]
    return path_names(factored.v_row, lambda v: v.shape != (1,))


# --- one and two real steps against the papers -------------------------------------------------

LR, WD, B1, B2, EPS = 0.1, 0.1, 0.9, 0.95, 1e-8
# A decayed small matrix, a decayed matrix large enough for Adafactor to factor (>= 128 on both
# axes), a non-decayed bias and a non-decayed norm scale.
SHAPES = {"small/kernel": ((6, 10), ("embed", "mlp")), "big/kernel": ((192, 128), ("mlp", "embed")),
          "small/bias": ((10,), ("mlp",)), "norm/scale": ((6,), ("norm",))}
DECAYED = {"small/kernel", "big/kernel"}


def adamw_direction(g, s, t):
    """Kingma & Ba: bias-corrected moments; at t=0 m_hat = g and v_hat = g^2, so g / (|g| + eps)."""
    s["m"] = B1 * s.get("m", 0.0) + (1 - B1) * g
    s["v"] = B2 * s.get("v", 0.0) + (1 - B2) * g**2
    m_hat, v_hat = s["m"] / (1 - B1 ** (t + 1)), s["v"] / (1 - B2 ** (t + 1))
    return m_hat / (np.sqrt(v_hat) + EPS)


def lion_direction(g, s, t):
    """Chen et al. 2023: the sign of an interpolation with b1, then the momentum moves with b2."""
    m = s.get("m", 0.0)
    direction = np.sign(B1 * m + (1 - B1) * g)
    s["m"] = B2 * m + (1 - B2) * g
    return direction


def sgd_direction(g, s, t):
    """Heavy-ball momentum m <- b1 m + g, the gradient undecayed (decoupled decay, not L2)."""
    s["m"] = B1 * s.get("m", 0.0) + g
    return s["m"]


def adafactor_direction(g, s, t):
    """Shazeer & Stern 2018, Algorithms 4-5 with beta2_t = 1 - t^-0.8 (t from 1) and eps1 = 1e-30:
    a matrix of at least 128 x 128 keeps row sums R and column sums C of g^2 + eps1 and estimates
    V = R C / (1^T R); anything smaller keeps V itself. The update g / sqrt(V) is divided by
    max(1, RMS), then averaged with momentum b1 (no bias correction)."""
    beta2 = 1.0 - (t + 1.0) ** -0.8  # 0 at the first step: the statistics are this gradient's
    g2 = g**2 + 1e-30
    if g.ndim == 2 and min(g.shape) >= 128:
        s["R"] = beta2 * s.get("R", 0.0) + (1 - beta2) * g2.sum(axis=1)
        s["C"] = beta2 * s.get("C", 0.0) + (1 - beta2) * g2.sum(axis=0)
        v = np.outer(s["R"], s["C"]) / s["R"].sum()
    else:
        s["V"] = beta2 * s.get("V", 0.0) + (1 - beta2) * g2
        v = s["V"]
    u = g / np.sqrt(v)
    rms = np.sqrt(np.mean(u**2))
    s.setdefault("rms", []).append(rms)
    s["m"] = B1 * s.get("m", 0.0) + (1 - B1) * u / max(1.0, rms)
    return s["m"]


DIRECTIONS = {"adamw": adamw_direction, "lion": lion_direction, "sgd": sgd_direction,
              "adafactor": adafactor_direction}


def reference(name, params, grads_per_step):
    """`p <- p - lr * (direction + wd * p)` (decay only on DECAYED), in float64; the params after
    each step and each parameter's optimizer state."""
    p = {k: v.astype(np.float64) for k, v in params.items()}
    state = {k: {} for k in p}
    history = []
    for t, grads in enumerate(grads_per_step):
        for k in p:
            direction = DIRECTIONS[name](grads[k].astype(np.float64), state[k], t)
            p[k] = p[k] - LR * (direction + (WD * p[k] if k in DECAYED else 0.0))
        history.append(dict(p))
    return history, state


def nested(flat):
    """{'a/b': x} -> {'a': {'b': x}}, the layout of a Flax param tree."""
    out = {}
    for path, value in flat.items():
        outer, inner = path.split("/")
        out.setdefault(outer, {})[inner] = value
    return out


@pytest.fixture(scope="module")
def hand_case():
    rng = np.random.default_rng(1)
    params = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _) in SHAPES.items()}
    # Elements of unequal scales. The second gradient is 10x the first for the small/ params and
    # 1/10 for the others, so at step 2 Adafactor's RMS clip both acts (an update RMS above 1,
    # the statistics remembering a smaller gradient) and does not (an RMS below 1).
    def gradient(scale):
        return {k: (scale(k) * rng.normal(size=shape) * rng.uniform(0.1, 2.0, size=shape)).astype(np.float32)
                for k, (shape, _) in SHAPES.items()}

    grads = [gradient(lambda k: 0.05), gradient(lambda k: 0.5 if k.startswith("small/") else 0.005)]
    boxed = nested({k: nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)
                    for k, (shape, names) in SHAPES.items()})
    return boxed, params, grads


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_two_steps_match_the_hand_computed_update(hand_case, name):
    boxed, params, grads = hand_case
    assert path_names(train.decay_mask(boxed, True)) == DECAYED
    c = tiny_config(name, lr=LR, weight_decay=WD, b1=B1, b2=B2, eps=EPS)
    history, _ = run(train.make_tx(c, boxed)[0], nested(params), [nested(g) for g in grads])
    expected, state = reference(name, params, grads)
    for step in range(2):
        for path in SHAPES:
            outer, inner = path.split("/")
            np.testing.assert_allclose(
                history[step][outer][inner], expected[step][path], rtol=1e-5, atol=1e-6,
                err_msg=f"{name} step {step + 1} {path}",
            )
    if name == "adafactor":  # both branches of the block-RMS clip were exercised
        rms = [r for s in state.values() for r in s["rms"]]
        assert min(rms) < 0.99 and max(rms) > 1.01, rms


def test_sgd_first_step_is_the_decoupled_closed_form(hand_case):
    """The first SGD step in closed form, p - lr (g + wd p), not p - lr g (1 + ...) or L2 through
    the momentum; the second step then carries m = b1 g_1 + g_2."""
    boxed, params, grads = hand_case
    c = tiny_config("sgd", lr=LR, weight_decay=WD, b1=B1)
    history, _ = run(train.make_tx(c, boxed)[0], nested(params), [nested(g) for g in grads])
    w, g1, g2 = params["small/kernel"], grads[0]["small/kernel"], grads[1]["small/kernel"]
    w1 = w - LR * (g1 + WD * w)
    np.testing.assert_allclose(history[0]["small"]["kernel"], w1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history[1]["small"]["kernel"], w1 - LR * (B1 * g1 + g2 + WD * w1),
                               rtol=1e-5, atol=1e-6)
    b, gb = params["small/bias"], grads[0]["small/bias"]
    np.testing.assert_allclose(history[0]["small"]["bias"], b - LR * gb, rtol=1e-5, atol=1e-6)


def test_global_norm_clipping_scales_the_gradient_before_the_direction(hand_case):
    """SGD without momentum or decay: the step is -lr * g * clip / |g| once |g| exceeds clip."""
    boxed, params, grads = hand_case
    g = grads[1]
    norm = np.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in g.values()))
    clip = norm / 4
    c = tiny_config("sgd", lr=LR, weight_decay=0.0, b1=0.0, clip=clip)
    history, _ = run(train.make_tx(c, boxed)[0], nested(params), [nested(g)])
    for path in SHAPES:
        outer, inner = path.split("/")
        np.testing.assert_allclose(history[0][outer][inner], params[path] - LR * g[path] / 4,
                                   rtol=1e-5, atol=1e-6, err_msg=path)
