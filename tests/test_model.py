"""The transformer's acceptance tests (issue 2): causality, packing, RoPE, remat, scan, counts, bf16.

Models are tiny (d=32, 2 layers, vocab 64), with numpy-drawn parameters (no init compile) and
jitted forward passes, to keep the file fast on a shared 2-core CPU.
"""

import functools
import importlib.util
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from lmjax.config import default_config
from lmjax.model import Transformer, flops_per_token, param_count
from lmjax.model import positions as pos_lib

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
V, L = 64, 12
REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides):
    c = default_config().model
    c.vocab_size = V
    c.embed_dim = 32
    c.num_heads = 4
    c.num_kv_heads = 2
    c.num_layers = 2
    c.max_len = 32
    c.init_std = 0.1  # larger than 0.02 so that every token visibly moves the logits
    for key, value in overrides.items():
        setattr(c, key, value)
    return c


@functools.lru_cache(maxsize=None)
def _params(frozen_cfg):
    """Random parameters of the right tree and shapes, drawn by numpy: no JAX compile per shape.

    Every leaf ~ N(0, 0.1^2), norm scales ~ N(1, 0.1^2), so biases and scales are exercised too.
    """
    shapes = jax.eval_shape(Transformer(frozen_cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        offset = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return jnp.asarray(offset + 0.1 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def init(cfg):
    return _params(FrozenConfigDict(cfg))


@functools.partial(jax.jit, static_argnums=0)
def _forward(frozen_cfg, params, tokens, positions, segment_ids):
    return Transformer(frozen_cfg).apply({"params": params}, tokens, positions, segment_ids)


def forward(cfg, params, tokens, positions=None, segment_ids=None):
    """Jitted: one compile per (config, shape) is cheaper here than op-by-op dispatch of new shapes."""
    return _forward(FrozenConfigDict(cfg), params, tokens, positions, segment_ids)


def random_tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def assert_causal(cfg, segment_ids=None):
    """Row t of a batch randomizes every token after t; logits at <= t must not change."""
    params = init(cfg)
    base_1xL = random_tokens(1, (1, L))
    noise_LxL = random_tokens(2, (L, L))
    future_LxL = jnp.arange(L)[None, :] > jnp.arange(L)[:, None]
    perturbed_LxL = jnp.where(future_LxL, noise_LxL, base_1xL)
    seg = None if segment_ids is None else jnp.broadcast_to(segment_ids, (L, L))
    pos = None
    if segment_ids is not None:  # positions restart at 0 in each packed document
        starts = np.maximum.accumulate(np.where(np.diff(segment_ids, prepend=-1) != 0, np.arange(L), 0))
        pos = jnp.broadcast_to(np.arange(L) - starts, (L, L))
    base_LxLxV = forward(cfg, params, jnp.broadcast_to(base_1xL, (L, L)), pos, seg)
    perturbed_LxLxV = forward(cfg, params, perturbed_LxL, pos, seg)
    past_LxL = ~future_LxL
    assert bool(jnp.any(jnp.where(future_LxL[..., None], perturbed_LxLxV != base_LxLxV, False)))
    np.testing.assert_array_equal(
        np.where(past_LxL[..., None], perturbed_LxLxV, 0), np.where(past_LxL[..., None], base_LxLxV, 0)
    )


@pytest.mark.parametrize("position", POSITIONS)
def test_future_tokens_never_change_past_logits_for_every_position_type(position):
    assert_causal(tiny_cfg(position=position))


@pytest.mark.parametrize("heads", ["mha", "mqa"])
@pytest.mark.parametrize("attention", ["einsum", "dot_product"])
def test_future_tokens_never_change_past_logits_mha_gqa_mqa(heads, attention):
    assert_causal(tiny_cfg(position="rope", num_kv_heads=HEADS[heads], attention=attention))


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_future_tokens_never_change_past_logits_with_packed_segments(position):
    assert_causal(tiny_cfg(position=position), segment_ids=np.array([1] * 5 + [2] * 4 + [3] * 3))


@pytest.mark.parametrize("position", POSITIONS)
def test_packed_second_document_equals_it_alone(position):
    cfg = tiny_cfg(position=position)
    params = init(cfg)
    doc_a, doc_b = random_tokens(3, (1, 5)), random_tokens(4, (1, 7))
    packed = jnp.concatenate([doc_a, doc_b], axis=1)
    positions = jnp.concatenate([jnp.arange(5), jnp.arange(7)])[None]
    segment_ids = jnp.array([[1] * 5 + [2] * 7])
    packed_logits = forward(cfg, params, packed, positions, segment_ids)
    np.testing.assert_allclose(packed_logits[:, 5:], forward(cfg, params, doc_b), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(packed_logits[:, :5], forward(cfg, params, doc_a), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scaling,factor", [("none", 1.0), ("linear", 4.0), ("ntk", 4.0)])
def test_rope_score_depends_only_on_relative_position(scaling, factor):
    E = 16
    inv_freq = pos_lib.rope_inv_freq(E, 10000.0, scaling, factor)
    q = jax.random.normal(jax.random.key(0), (1, 1, 1, E))
    k = jax.random.normal(jax.random.key(1), (1, 1, 1, E))

    def score(m, n):
        qm = pos_lib.apply_rope(q, jnp.array([[m]]), inv_freq)
        kn = pos_lib.apply_rope(k, jnp.array([[n]]), inv_freq)
        return float(jnp.sum(qm * kn))

    for offset in (0, 3, 17):
        reference = score(offset, 0)
        for shift in (1, 50, 900):
            assert score(offset + shift, shift) == pytest.approx(reference, abs=1e-4)
    assert score(5, 0) != pytest.approx(score(6, 0), abs=1e-4)


def test_rope_scaling_changes_frequencies_as_documented():
    base = pos_lib.rope_inv_freq(16, 10000.0)
    np.testing.assert_allclose(pos_lib.rope_inv_freq(16, 10000.0, "linear", 4.0), base / 4, rtol=1e-6)
    ntk = pos_lib.rope_inv_freq(16, 10000.0, "ntk", 4.0)
    assert float(ntk[0]) == float(base[0]) and float(ntk[-1]) == pytest.approx(float(base[-1]) / 4, rel=1e-5)


def test_alibi_slopes_follow_the_paper():
    np.testing.assert_allclose(pos_lib.alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)], rtol=1e-6)
    assert pos_lib.alibi_slopes(12).shape == (12,)


def test_param_count_gpt2_124m_is_published_and_equals_tree():
    cfg = load_config("gpt2_124m").model
    assert param_count(cfg) == 124_439_808
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 124_439_808
    assert param_count(cfg, non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    assert flops_per_token(cfg, 1024) == 6 * (85_056_000 + 768 * 50257) + 12 * 12 * 768 * 1024


def test_param_count_llama_matches_closed_form_and_tree():
    cfg = load_config("llama_tiny").model
    cfg.vocab_size = 4096
    Vv, D, N, H, K, E, F = 4096, 256, 4, 8, 2, 32, 688
    closed = 2 * Vv * D + N * (D * H * E + 2 * D * K * E + H * E * D + 3 * D * F + 2 * D) + D
    assert param_count(cfg) == closed
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == closed


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(qk_norm=True, position="alibi", num_kv_heads=1, mlp="relu", head_dim=16),
        dict(norm="rmsnorm", use_bias=False, tie_embeddings=False, mlp="swiglu", mlp_dim=40, scan_layers=True),
    ],
)
def test_param_count_equals_initialized_tree(overrides):
    cfg = tiny_cfg(**overrides)
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == param_count(cfg)


def test_configs_load_and_describe_the_intended_models():
    small = load_config("gpt_small")
    assert small.model.max_len == small.data.seq_len == 128
    small.model.vocab_size = small.data.vocab_size
    assert 2e6 <= param_count(small.model) <= 5e6
    llama = load_config("llama_tiny").model
    assert (llama.norm, llama.mlp, llama.position, llama.use_bias, llama.tie_embeddings) == (
        "rmsnorm", "swiglu", "rope", False, False)
    assert 1 < llama.num_kv_heads < llama.num_heads


def test_every_parameter_has_logical_axis_names():
    for scan in (False, True):
        boxed = Transformer(tiny_cfg(scan_layers=scan, position="learned")).init(
            jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
        names = {n for leaf in leaves for n in leaf.names}
        assert {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"} <= names
        assert ("layers" in names) == scan


def loss_and_grads(cfg, params, tokens):
    def loss_fn(p):
        logits = Transformer(cfg).apply({"params": p}, tokens[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1))

    return jax.value_and_grad(loss_fn)(params)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_loss_or_grads(remat):
    tokens = random_tokens(5, (2, L))
    params = init(tiny_cfg())
    loss, grads = loss_and_grads(tiny_cfg(), params, tokens)
    loss_r, grads_r = loss_and_grads(tiny_cfg(remat=remat), params, tokens)
    assert float(loss_r) == pytest.approx(float(loss), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r, grads)


def test_remat_under_scan_matches_too():
    tokens = random_tokens(5, (2, L))
    params = init(tiny_cfg(scan_layers=True))
    loss, grads = loss_and_grads(tiny_cfg(scan_layers=True), params, tokens)
    loss_r, grads_r = loss_and_grads(tiny_cfg(scan_layers=True, remat="full"), params, tokens)
    assert float(loss_r) == pytest.approx(float(loss), abs=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), grads_r, grads)


def unstack_layers(scanned_params, num_layers):
    """Scanned layout ('blocks' with a leading layer axis) -> unscanned ('block_0', 'block_1', ...)."""
    params = {k: v for k, v in scanned_params.items() if k != "blocks"}
    for i in range(num_layers):
        params[f"block_{i}"] = jax.tree.map(lambda x: x[i], scanned_params["blocks"])
    return params


@pytest.mark.parametrize("position", ["learned", "rope"])
def test_scanned_layers_match_unscanned(position):
    scanned_cfg = tiny_cfg(scan_layers=True, position=position)
    scanned = init(scanned_cfg)
    tokens = random_tokens(6, (2, L))
    unscanned = unstack_layers(scanned, 2)
    assert jax.tree.structure(unscanned) == jax.tree.structure(init(tiny_cfg(position=position)))
    np.testing.assert_allclose(
        forward(scanned_cfg, scanned, tokens), forward(tiny_cfg(position=position), unscanned, tokens), atol=1e-5
    )


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(position="alibi"), dict(num_kv_heads=1, qk_norm=True)],
)
def test_dot_product_attention_path_matches_einsum(overrides):
    cfg = tiny_cfg(**overrides)
    params = init(cfg)
    tokens = random_tokens(7, (2, L))
    segment_ids = jnp.array([[1] * 6 + [2] * 6, [1] * L])
    for seg in (None, segment_ids):
        np.testing.assert_allclose(
            forward(tiny_cfg(attention="dot_product", **overrides), params, tokens, None, seg),
            forward(cfg, params, tokens, None, seg),
            atol=1e-5,
        )


def test_bfloat16_compute_stays_close_to_float32():
    """Stated tolerance: bf16 logits within 0.05 absolute (logit spread here is ~2) of f32."""
    cfg32, cfg16 = tiny_cfg(position="rope"), tiny_cfg(position="rope", dtype="bfloat16")
    params = init(cfg32)
    tokens = random_tokens(8, (2, L))
    logits32, logits16 = forward(cfg32, params, tokens), forward(cfg16, params, tokens)
    assert logits16.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits16)))
    assert float(jnp.std(logits32)) > 0.3
    np.testing.assert_allclose(logits16, logits32, atol=0.05)
    assert float(jnp.mean(jnp.argmax(logits16, -1) == jnp.argmax(logits32, -1))) > 0.9


def test_dropout_uses_rng_only_when_not_deterministic():
    cfg = tiny_cfg(dropout=0.3)
    params = init(cfg)
    tokens = random_tokens(9, (2, L))
    model = Transformer(cfg)
    det = model.apply({"params": params}, tokens)
    np.testing.assert_allclose(det, forward(tiny_cfg(), params, tokens), atol=1e-6)
    drop = [model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(s)})
            for s in (0, 0, 1)]
    np.testing.assert_array_equal(drop[0], drop[1])
    assert not np.allclose(drop[0], drop[2]) and not np.allclose(drop[0], det)


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="config.model.vocab_size"):
        param_count(tiny_cfg(vocab_size=None))
    with pytest.raises(ValueError, match="config.model.position"):
        forward(tiny_cfg(position="nope"), {}, jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="num_kv_heads"):
        param_count(tiny_cfg(num_kv_heads=3))
