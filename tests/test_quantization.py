"""Weight-only int8 / int4 quantization (qwix): the error bound of each weight, the forward pass the
quantized params run, their bytes, and an exact orbax round trip."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import FrozenConfigDict

from lmjax.infer import quantization as run_quant
from lmjax.model import decoding
from lmjax.model import quantization as quant
from test_model import forward, init, random_tokens, tiny_cfg

# Symmetric absmax quantization maps [-absmax, absmax] onto [-(qmax + 1/2), qmax + 1/2] steps.
QMAX = {"int8": 127, "int4": 7}
GROUP = 16
# qwix 0.1.8 on flax 0.12.8 warns on every module that nnx.VariableState is now Variable.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def model():
    """An untied head, so that every matmul weight is quantized, and D, F divisible by the group."""
    cfg = tiny_cfg(position="rope", tie_embeddings=False)
    return cfg, init(cfg)


@pytest.fixture(scope="module")
def quantized(model):
    cfg, params = model
    return {mode: quant.quantize_params(cfg, params, mode, GROUP) for mode in ("int8", "int4")}


def kernel_paths(params):
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    return [p for p in paths if p.endswith("['kernel']") or p == "['head']"]


def float_leaf(params, path):
    node = params
    for key in path.split("/"):
        node = node[key]
    return np.asarray(node)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_each_weight_is_within_half_a_step_of_its_quantized_value(model, quantized, mode):
    """|w - dequantized(w)| <= step / 2, with step = absmax / (qmax + 1/2) over each output channel
    (int8) or each group of GROUP input features along the contraction axis (int4)."""
    cfg, params = model
    weights = quant.weight_leaves(quantized[mode])
    assert len(weights) == len(kernel_paths(params)) == 6 * cfg.num_layers + 1
    for path, weight in weights.items():
        w = float_leaf(params, path)
        qarray = weight.array
        assert qarray.qvalue.dtype == quant.QTYPES[mode] and qarray.qvalue.shape == w.shape
        contract = tuple(range(w.ndim - 1)) if not path.endswith("out/kernel") else (0, 1)
        if mode == "int4" and not path.endswith("out/kernel"):
            # Groups of GROUP rows along the innermost contraction axis (axis 0 here: [D or F, ...]).
            grouped = w.reshape(w.shape[0] // GROUP, GROUP, *w.shape[1:])
            absmax = np.abs(grouped).max(axis=1, keepdims=True)
            step = np.broadcast_to(absmax / (QMAX[mode] + 0.5), grouped.shape).reshape(w.shape)
        else:
            step = np.broadcast_to(np.abs(w).max(axis=contract, keepdims=True) / (QMAX[mode] + 0.5), w.shape)
        error = np.abs(w - np.asarray(jax.device_get(_dequantize(qarray))))
        assert np.all(error <= step / 2 * (1 + 1e-4)), path  # float32 rounding at the bucket edge
        assert error.max() > step.max() / 20  # the weights really moved: this is not the float tree


def _dequantize(qarray):
    import qwix

    return qwix.dequantize(qarray)


def rms(x):
    return float(jnp.sqrt(jnp.mean(jnp.square(x))))


def test_quantized_decoding_runs_on_the_dequantized_weights_and_int8_stays_close(model, quantized):
    """The KV-cache path of a quantized model equals the float model on the dequantized weights, so
    its only error is the weights'. That error is bounded to first order: the M = 6N + 1 matmuls on a
    token's path each move their output by about their relative weight error r, independently, so
    the logits move by at most ~sqrt(M) r of their size (measured here: ~2.5 r)."""
    cfg, params = model
    tokens = random_tokens(3, (2, 12))
    exact = forward(cfg, params, tokens)
    relative = {}
    for mode, qparams in quantized.items():
        qcfg = FrozenConfigDict(quant.with_quantization(cfg, mode, GROUP))
        logits, _ = jax.jit(decoding.prefill, static_argnums=0)(qcfg, qparams, decoding.init_cache(qcfg, 2, 12), tokens)
        dequantized = quant.dequantize_params(qparams)
        np.testing.assert_allclose(logits, forward(cfg, dequantized, tokens), atol=1e-4, rtol=1e-4)
        moved = [float_leaf(params, p) - float_leaf(dequantized, p) for p in quant.weight_leaves(qparams)]
        size = [float_leaf(params, p) for p in quant.weight_leaves(qparams)]
        r = math.sqrt(sum(np.sum(m**2) for m in moved) / sum(np.sum(w**2) for w in size))
        relative[mode] = rms(logits - exact) / rms(exact)
        assert relative[mode] <= math.sqrt(6 * cfg.num_layers + 1) * r
    assert relative["int8"] < 0.03 and relative["int8"] < relative["int4"] / 4


def test_parameter_bytes_shrink_as_counted_by_hand(model, quantized):
    """Float32 params minus 3 (int8) or 3.5 (int4) bytes per quantized weight, plus a float32 scale
    per output channel (int8) or per output channel and group (int4, but the attention output)."""
    cfg, params = model
    float_bytes = quant.param_bytes(params)
    assert float_bytes == 4 * sum(x.size for x in jax.tree_util.tree_leaves(params))
    H, K, D, F, V = cfg.num_heads, cfg.num_kv_heads, cfg.embed_dim, 4 * cfg.embed_dim, cfg.vocab_size
    E = D // H
    # (weights, output channels, input features of the grouped axis) per layer and for the head.
    shapes = [(D * H * E, H * E, D), (D * K * E, K * E, D), (D * K * E, K * E, D), (H * E * D, D, None),
              (D * F, F, D), (F * D, D, F)] * cfg.num_layers + [(D * V, V, D)]
    weights = sum(n for n, _, _ in shapes)
    int8_scales = sum(channels for _, channels, _ in shapes)
    int4_scales = sum(channels * (1 if inputs is None else inputs // GROUP) for _, channels, inputs in shapes)
    assert quant.param_bytes(quantized["int8"]) == float_bytes - 3 * weights + 4 * int8_scales
    assert quant.param_bytes(quantized["int4"]) == float_bytes - 3.5 * weights + 4 * int4_scales


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_params_round_trip_through_orbax_exactly(model, quantized, mode, tmp_path):
    cfg, _ = model
    directory = str(tmp_path / mode)
    run_quant.save(directory, quantized[mode])
    back = run_quant.restore(directory, cfg, mode, GROUP)
    want, got = jax.tree_util.tree_leaves(quantized[mode]), jax.tree_util.tree_leaves(back)
    assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(quantized[mode])
    for a, b in zip(want, got):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32)))


def test_bad_mode_is_named(model):
    cfg, params = model
    with pytest.raises(ValueError, match="quantize='int3'"):
        quant.quantize_params(cfg, params, "int3")
    with pytest.raises(ValueError, match="scan_layers"):
        quant.quantize_params(tiny_cfg(scan_layers=True), params, "int8")
    assert math.gcd(GROUP, cfg.embed_dim, 4 * cfg.embed_dim) == GROUP
