"""The transformer's acceptance tests (issue 2): causality, packing, RoPE, remat, scan, counts, bf16.

Models are tiny (d=32, 2 layers, vocab 64), with numpy-drawn parameters (no init compile) and
jitted forward passes, to keep the file fast on a shared 2-core CPU.
"""

import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from lmjax import config as config_lib
from lmjax.config import default_config
from lmjax.model import Transformer, flops_per_token, param_count
from lmjax.model import manual_vjp, matmul
from lmjax.model import positions as pos_lib

POSITIONS = ("learned", "sinusoidal", "rope", "alibi", "none")
HEADS = {"mha": 4, "gqa": 2, "mqa": 1}
V, L = 64, 12
REPO = pathlib.Path(__file__).resolve().parents[1]
# Tiny models: XLA's CPU backend optimizations cost more compile time than they save at run time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


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


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _forward(frozen_cfg, params, tokens, positions, segment_ids):
    return Transformer(frozen_cfg).apply({"params": params}, tokens, positions, segment_ids)


def forward(cfg, params, tokens, positions=None, segment_ids=None):
    """Jitted: one compile per (config, shape) is cheaper here than op-by-op dispatch of new shapes."""
    return _forward(FrozenConfigDict(cfg), params, tokens, positions, segment_ids)


def random_tokens(seed, shape):
    return jax.random.randint(jax.random.key(seed), shape, 0, V, dtype=jnp.int32)


def load_config(name):
    return config_lib.load(f"configs/{name}.py")


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


@pytest.mark.parametrize("heads,attention", [("mqa", "einsum"), ("mha", "dot_product")])
def test_future_tokens_never_change_past_logits_mha_gqa_mqa(heads, attention):
    """GQA (the default 4 heads / 2 kv heads) is covered by the position-type test above."""
    assert_causal(tiny_cfg(position="rope", num_kv_heads=HEADS[heads], attention=attention))


@pytest.mark.parametrize("position", ["learned", "alibi"])
def test_future_tokens_never_change_past_logits_with_packed_segments(position):
    assert_causal(tiny_cfg(position=position), segment_ids=np.array([1] * 5 + [2] * 4 + [3] * 3))


@pytest.mark.parametrize("position", POSITIONS)
def test_packed_second_document_equals_it_alone(position):
    """Row 0 packs doc A (5 tokens) and doc B (7); row 1 is doc B alone, right-padded to 12."""
    cfg = tiny_cfg(position=position)
    doc_a, doc_b = np.asarray(random_tokens(3, (5,))), np.asarray(random_tokens(4, (7,)))
    tokens = np.stack([np.concatenate([doc_a, doc_b]), np.concatenate([doc_b, doc_a])])
    positions = np.stack([np.concatenate([np.arange(5), np.arange(7)]), np.arange(12)])
    segment_ids = np.array([[1] * 5 + [2] * 7, [1] * 12])
    logits = forward(cfg, init(cfg), tokens, positions, segment_ids)
    np.testing.assert_allclose(logits[0, 5:], logits[1, :7], atol=1e-5, rtol=1e-5)


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
    cfg.vocab_multiple = 1  # the published, unpadded vocabulary
    assert param_count(cfg) == 124_439_808
    shapes = jax.eval_shape(Transformer(cfg).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 124_439_808
    assert param_count(cfg, non_embedding=True) == 124_439_808 - 50257 * 768 - 1024 * 768
    assert flops_per_token(cfg, 1024) == 6 * (85_056_000 + 768 * 50257) + 12 * 12 * 768 * 1024
    padded = load_config("gpt2_124m").model  # as configured: 50,304 rows, 47 of them padding
    shapes = jax.eval_shape(Transformer(padded).init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
    assert shapes["params"]["embedding"].value.shape == (50304, 768)
    assert param_count(padded) == sum(x.size for x in jax.tree.leaves(shapes)) == 124_439_808 + 47 * 768


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
        dict(norm="rmsnorm", use_bias=False, tie_embeddings=False, mlp="swiglu", mlp_dim=40,
             scan_layers=True),
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
        boxed = jax.eval_shape(Transformer(tiny_cfg(scan_layers=scan, position="learned")).init,
                               jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
        for leaf in leaves:
            assert isinstance(leaf, nn.Partitioned) and len(leaf.names) == leaf.value.ndim
        names = {n for leaf in leaves for n in leaf.names}
        assert {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "norm"} <= names
        assert ("layers" in names) == scan


@functools.partial(jax.jit, static_argnums=0, compiler_options=FAST_COMPILE)
def _loss_and_grads(frozen_cfg, params, tokens):
    """((loss, logits), grads) of next-token cross-entropy."""

    def loss_fn(p):
        logits = Transformer(frozen_cfg).apply({"params": p}, tokens[:, :-1])
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], axis=-1)
        return jnp.mean(nll), logits

    return jax.value_and_grad(loss_fn, has_aux=True)(params)


def loss_and_grads(cfg, params, tokens):
    return _loss_and_grads(FrozenConfigDict(cfg), params, tokens)


def assert_same_loss_and_grads(a, b):
    (loss_a, logits_a), (loss_b, logits_b) = a[0], b[0]
    assert float(loss_a) == pytest.approx(float(loss_b), abs=1e-6)
    np.testing.assert_allclose(logits_a, logits_b, atol=1e-5)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5), a[1], b[1])


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_changes_memory_not_loss_or_grads(remat):
    tokens = random_tokens(5, (2, L))
    params = init(tiny_cfg())
    assert_same_loss_and_grads(loss_and_grads(tiny_cfg(remat=remat), params, tokens),
                               loss_and_grads(tiny_cfg(), params, tokens))


def unstack_layers(scanned_params, num_layers):
    """Scanned layout ('blocks' with a leading layer axis) -> unscanned ('block_0', 'block_1', ...)."""
    params = {k: v for k, v in scanned_params.items() if k != "blocks"}
    for i in range(num_layers):
        params[f"block_{i}"] = jax.tree.map(lambda x: x[i], scanned_params["blocks"])
    return params


def test_scanned_layers_match_unscanned_outputs_loss_and_grads():
    """Scan (with full remat) vs a Python loop of blocks, same weights mapped between layouts:
    same logits, loss and gradients."""
    scanned_cfg = tiny_cfg(scan_layers=True, remat="full")
    scanned = init(scanned_cfg)
    unscanned = unstack_layers(scanned, 2)
    assert jax.tree.structure(unscanned) == jax.tree.structure(init(tiny_cfg()))
    tokens = random_tokens(5, (2, L))
    outputs, grads = loss_and_grads(scanned_cfg, scanned, tokens)
    reference = loss_and_grads(tiny_cfg(), unscanned, tokens)
    assert_same_loss_and_grads((outputs, unstack_layers(grads, 2)), reference)


@pytest.mark.parametrize(
    "overrides,segment_ids",
    [
        (dict(position="alibi"), np.array([[1] * 6 + [2] * 6, [1] * L])),  # bias + mask, GQA
        (dict(position="alibi", num_kv_heads=4), np.array([[1] * 6 + [2] * 6, [1] * L])),  # MHA
        (dict(num_kv_heads=1, qk_norm=True), None),  # is_causal, MQA
    ],
)
def test_dot_product_attention_path_matches_einsum(overrides, segment_ids):
    cfg = tiny_cfg(**overrides)
    params = init(cfg)
    tokens = random_tokens(7, (2, L))
    np.testing.assert_allclose(
        forward(tiny_cfg(attention="dot_product", **overrides), params, tokens, None, segment_ids),
        forward(cfg, params, tokens, None, segment_ids),
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
    det = forward(cfg, params, tokens)
    apply = jax.jit(lambda p, t, key: Transformer(cfg).apply(
        {"params": p}, t, deterministic=False, rngs={"dropout": key}), compiler_options=FAST_COMPILE)
    drop = [apply(params, tokens, jax.random.key(s, impl="rbg")) for s in (0, 0, 1)]
    np.testing.assert_array_equal(drop[0], drop[1])
    assert not np.allclose(drop[0], drop[2]) and not np.allclose(drop[0], det)


def test_bad_config_values_name_the_key():
    with pytest.raises(ValueError, match="config.model.vocab_size"):
        param_count(tiny_cfg(vocab_size=None))
    with pytest.raises(ValueError, match="config.model.position"):
        forward(tiny_cfg(position="nope"), {}, jnp.zeros((1, 2), jnp.int32))
    with pytest.raises(ValueError, match="num_kv_heads"):
        param_count(tiny_cfg(num_kv_heads=3))


SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jax.sharding import AxisType, Mesh
from lmjax.config import DEFAULT_RULES
from lmjax.model import Transformer
from test_model import FAST_COMPILE, tiny_cfg
cfg = tiny_cfg(position="rope", scan_layers=True)
model, tokens = Transformer(cfg), jnp.arange(64, dtype=jnp.int32).reshape(4, 16) % 64
devices = np.array(jax.devices()).reshape(1, 2, 1, 2)
mesh = Mesh(devices, ("data", "fsdp", "expert", "tensor"), axis_types=(AxisType.Auto,) * 4)
abstract = jax.eval_shape(model.init, jax.random.key(0), tokens)
shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, DEFAULT_RULES)
with jax.set_mesh(mesh), nn.logical_axis_rules(DEFAULT_RULES):
    init = jax.jit(model.init, out_shardings=shardings, compiler_options=FAST_COMPILE)
    params = init(jax.random.key(0), tokens)
    sharded = jax.jit(model.apply, compiler_options=FAST_COMPILE)(params, tokens)
kernel = params["params"]["blocks"]["attn"]["query"]["kernel"].value
assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
np.testing.assert_allclose(sharded, model.apply(jax.device_get(params), tokens), atol=1e-5)
print("ok")
"""


def test_sharded_init_and_forward_on_a_2x2_mesh_match_unsharded():
    """Logical names -> DEFAULT_RULES -> a (data 1, fsdp 2, tensor 2) mesh of 4 fake CPU devices."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    result = subprocess.run([sys.executable, "-c", SHARDED_SCRIPT], env=env, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_cpu_backward_fusions_do_not_grow_with_depth():
    """XLA's CPU fusion would recompute each block's residual-stream cotangent in every block below
    it; the model materializes it, so the largest backward fusion is the same at 2 and 6 layers."""
    import re

    def largest_fusion(num_layers):
        cfg = tiny_cfg(num_layers=num_layers)
        tokens = jnp.zeros((2, 16), jnp.int32)
        params = Transformer(cfg).init(jax.random.key(0), tokens)["params"]
        loss = lambda p: jnp.sum(jnp.sin(Transformer(cfg).apply({"params": p}, tokens)))
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        bodies = re.findall(r"\n%fused[\w.]* [^\n]*\{\n(.*?)\n\}", hlo, re.S)
        return max(body.count("\n") + 1 for body in bodies)

    assert largest_fusion(6) == largest_fusion(2)


@pytest.mark.parametrize("shapes", [((3, 5, 7), (7, 4), 1), ((3, 5, 6), (6, 2, 3), 1), ((3, 5, 2, 3), (2, 3, 6), 2)])
def test_weight_dot_general_gradients_equal_autodiff(shapes):
    x_shape, w_shape, n = shapes
    x = jax.random.normal(jax.random.key(1), x_shape)
    w = jax.random.normal(jax.random.key(2), w_shape)
    dims = ((tuple(range(len(x_shape) - n, len(x_shape))), tuple(range(n))), ((), ()))

    def loss(dot):
        return lambda x, w: jnp.sum(jnp.sin(dot(x, w, dims)))

    ours = jax.jit(jax.grad(loss(matmul.weight_dot_general), (0, 1)))(x, w)
    autodiff = jax.jit(jax.grad(loss(jax.lax.dot_general), (0, 1)))(x, w)
    for a, b in zip(ours, autodiff):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_weight_gradients_are_untransposed_matmuls():
    """On CPU every weight gradient is a dot whose left operand contracts its last axis (the form
    XLA's fast matmul library takes); with plain autodiff some contract their first."""
    import re

    def transposed_dots(cfg):
        tokens = jnp.zeros((2, 16), jnp.int32)
        params = Transformer(cfg).init(jax.random.key(0), tokens)["params"]
        loss = lambda p: jnp.sum(jnp.sin(Transformer(cfg).apply({"params": p}, tokens)))
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        dots = re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} dot\(.*?lhs_contracting_dims=\{(\d+)\}.*?op_name=\"([^\"]+)\"", hlo)
        return [name for contract, name in dots if contract == "0" and re.search(r"/(mlp|attn)/", name)]

    assert transposed_dots(tiny_cfg(num_layers=1)) == []
    assert transposed_dots(tiny_cfg(num_layers=1, remat="full")) != []  # the plain autodiff form, which remat keeps


def test_cpu_head_gradient_does_not_transpose_the_logits_gradient():
    """On CPU the (tied) LM head's weight gradient transposes its [B*L, D] input, not the [B*L, V]
    logits gradient, the step's largest array (vocabulary, width and tokens all differ here)."""
    import re

    def logits_sized_arrays_vocab_first(cfg):
        tokens = jnp.zeros((2, 24), jnp.int32)
        params = Transformer(cfg).init(jax.random.key(0), tokens)["params"]
        loss = lambda p: jnp.sum(jnp.sin(Transformer(cfg).apply({"params": p}, tokens)))
        hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        shapes = re.findall(r"= f32\[([\d,]+)\]\{[\d,]+\} (?!parameter)", hlo[hlo.index("\nENTRY"):])
        return [s for s in shapes if s in ("96,48", "96,2,24")]

    assert logits_sized_arrays_vocab_first(tiny_cfg(num_layers=1, vocab_size=96)) == []
    assert logits_sized_arrays_vocab_first(tiny_cfg(num_layers=1, vocab_size=96, remat="full")) != []  # einsum's


@pytest.mark.parametrize("layer", ["layernorm", "layernorm_bias", "rmsnorm", "gelu", "gelu_tanh"])
def test_hand_written_backward_passes_equal_autodiff(layer):
    """lmjax.model.manual_vjp's rules against autodiff of the layers' plain code: the same forward
    values, and gradients for the input and the scale (and bias) equal to float rounding."""
    from lmjax.model import mlp, norms

    x = 3.0 * jax.random.normal(jax.random.key(1), (2, 5, 16)) + 0.5
    cotangent = jax.random.normal(jax.random.key(2), x.shape)
    if layer.startswith("gelu"):
        params = {}
        plain = lambda params, x: mlp.ACTIVATIONS[layer](x)  # noqa: E731
        manual = lambda params, x: manual_vjp.ACTIVATIONS[layer](x)  # noqa: E731
    else:
        def make(manual):
            if layer == "rmsnorm":
                return norms.RMSNorm(manual_vjp=manual)
            return norms.LayerNorm(use_bias=layer == "layernorm_bias", manual_vjp=manual)

        params = make(False).init(jax.random.key(0), x)  # then moved off their 1s and 0s
        params = jax.tree.map(lambda p: p + jax.random.normal(jax.random.key(3), p.shape), params)
        plain = lambda params, x: make(False).apply(params, x)  # noqa: E731
        manual = lambda params, x: make(True).apply(params, x)  # noqa: E731

    def forward_and_grads(fn):
        grads = jax.jit(jax.grad(lambda params, x: jnp.sum(fn(params, x) * cotangent), (0, 1)))(params, x)
        return fn(params, x), grads

    (y_plain, grads_plain), (y_manual, grads_manual) = forward_and_grads(plain), forward_and_grads(manual)
    np.testing.assert_allclose(y_manual, y_plain, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), grads_manual, grads_plain)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])  # MHA, GQA, MQA
def test_hand_written_attention_backward_equals_autodiff(kv_heads):
    from lmjax.model import attention

    B, L, H, E = 2, 6, 4, 8
    q = jax.random.normal(jax.random.key(1), (B, L, H, E))
    k, v = (jax.random.normal(jax.random.key(i), (B, L, kv_heads, E)) for i in (2, 3))
    mask = jnp.tril(jnp.ones((L, L), bool))[None, None]
    cotangent = jax.random.normal(jax.random.key(4), (B, L, H, E))

    def forward_and_grads(manual):
        fn = lambda q, k, v: attention.einsum_attention(q, k, v, mask, None, manual_backward=manual)  # noqa: E731
        grads = jax.jit(jax.grad(lambda *qkv: jnp.sum(fn(*qkv) * cotangent), (0, 1, 2)))(q, k, v)
        return fn(q, k, v), grads

    (y_plain, grads_plain), (y_manual, grads_manual) = forward_and_grads(False), forward_and_grads(True)
    np.testing.assert_allclose(y_manual, y_plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_manual, grads_plain):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
