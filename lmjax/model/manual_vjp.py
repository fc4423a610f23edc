"""Backward passes written by hand: LayerNorm, RMSNorm, GELU, and softmax attention.

Autodiff differentiates the elementwise layers op by op: under `grad` the forward pass keeps several
intermediates of each (GELU's erf and its product, a norm's centred input, its deviation and
their product) and the backward pass rebuilds the textbook gradient from a chain of small ops.
XLA's CPU compiler turns those into passes of their own over [tokens, features] buffers. Each rule
below keeps one array (the input, or the normalized input with its inverse deviation) and computes
the gradient in one expression (attention: see `softmax_attention`). The forward passes are the
layers' own expressions; the gradients equal autodiff's to float rounding (tests/test_model.py).

A custom VJP's residuals are kept whatever a remat policy says, so the model uses these rules only
without remat (`enabled`), as `matmul.dot_general_for` does for the weight matmuls.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715


def enabled(cfg) -> bool:
    """Whether `config.model` trains with these rules: only when no remat policy is set."""
    return cfg.remat == "none"


def _sum_over_tokens(x: jax.Array) -> jax.Array:
    return jnp.sum(x.reshape(-1, x.shape[-1]), axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def layer_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """(x - mean) / sqrt(var + eps) * scale over the last axis (float32 in, float32 out)."""
    return _layer_norm_fwd(x, scale, eps)[0]


def _layer_norm_fwd(x, scale, eps):
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    inv_std = jnp.reciprocal(jnp.sqrt(var + eps))
    normed = (x - mean) * inv_std
    return normed * scale, (normed, inv_std, scale)


def _layer_norm_bwd(eps, residuals, g):
    del eps
    normed, inv_std, scale = residuals
    g_scaled = g * scale
    dx = inv_std * (
        g_scaled - g_scaled.mean(-1, keepdims=True) - normed * (g_scaled * normed).mean(-1, keepdims=True)
    )
    return dx, _sum_over_tokens(g * normed)


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis (float32 in, float32 out)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    inv_rms = jnp.reciprocal(jnp.sqrt(jnp.square(x).mean(-1, keepdims=True) + eps))
    normed = x * inv_rms
    return normed * scale, (normed, inv_rms, scale)


def _rms_norm_bwd(eps, residuals, g):
    del eps
    normed, inv_rms, scale = residuals
    g_scaled = g * scale
    dx = inv_rms * (g_scaled - normed * (g_scaled * normed).mean(-1, keepdims=True))
    return dx, _sum_over_tokens(g * normed)


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def gelu_erf(x: jax.Array) -> jax.Array:
    """x * Phi(x) through erf, as PyTorch writes it: `nn.gelu(approximate=False)` goes through erfc,
    which XLA's CPU backend lowers to two evaluated branches and a select."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * _INV_SQRT_2))


@jax.custom_vjp
def gelu_exact(x: jax.Array) -> jax.Array:
    """`gelu_erf` with d/dx = Phi(x) + x * phi(x) computed from x alone."""
    return gelu_erf(x)


def _gelu_exact_bwd(x, g):
    cdf = 0.5 * (1.0 + jax.lax.erf(x * _INV_SQRT_2))
    pdf = jnp.exp(-0.5 * jnp.square(x)) * _INV_SQRT_2PI
    return (g * (cdf + x * pdf),)


gelu_exact.defvjp(lambda x: (gelu_exact(x), x), _gelu_exact_bwd)


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GPT-2's tanh GELU, the same expression as `jax.nn.gelu(x, approximate=True)`."""
    return x * (0.5 * (1.0 + jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_CUBIC * (x**3)))))


def _gelu_tanh_bwd(x, g):
    tanh = jnp.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_CUBIC * (x**3)))
    du_dx = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * jnp.square(x))
    return (g * (0.5 * (1.0 + tanh) + 0.5 * x * (1.0 - jnp.square(tanh)) * du_dx),)


gelu_tanh.defvjp(lambda x: (gelu_tanh(x), x), _gelu_tanh_bwd)

ACTIVATIONS = {"gelu": gelu_exact, "gelu_tanh": gelu_tanh}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, axes: tuple[str, str, str]):
    """softmax(q k^T / sqrt(E), masked) v, as `attention.einsum_attention` computes it without a bias
    or dropout; `axes` are its einsum subscripts (queries, keys and values, logits).

    The backward pass takes the softmax's row sum from the saved probabilities, and forms the key and
    value gradients, which sum over query positions, from queries and output gradients written with
    those positions last: plain matmuls, where autodiff's contract a transposed operand."""
    return _attention_fwd(q, k, v, mask, axes)[0]


def _attention_fwd(q, k, v, mask, axes):
    q_axes, kv_axes, logit_axes = axes
    logits = jnp.einsum(f"{q_axes},{kv_axes}->{logit_axes}", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.float32(math.sqrt(q.shape[-1]))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(f"{logit_axes},{kv_axes}->{q_axes}", probs.astype(v.dtype), v)
    return out, (q, k, v, probs)


def _sum_over_queries(weights: jax.Array, x: jax.Array, axes: tuple[str, str, str]) -> jax.Array:
    """sum over query positions (and query heads of a group) of weights[..., l, s] x[..., l, e], in the
    keys' axis order."""
    q_axes, kv_axes, logit_axes = axes
    batch = "".join(a for a in logit_axes if a in kv_axes and a != "s")
    summed = "".join(a for a in logit_axes if a not in kv_axes)  # the group axis (if any), then l
    x_t = x.transpose([q_axes.index(a) for a in f"{batch}e{summed}"])
    out = jnp.einsum(f"{batch}e{summed},{logit_axes}->{batch}es", x_t, weights.astype(x.dtype))
    return out.transpose([f"{batch}es".index(a) for a in kv_axes])


def _attention_bwd(axes, residuals, d_out):
    q_axes, kv_axes, logit_axes = axes
    q, k, v, probs = residuals
    d_probs = jnp.einsum(f"{q_axes},{kv_axes}->{logit_axes}", d_out, v, preferred_element_type=jnp.float32)
    d_logits = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    d_logits = d_logits / jnp.float32(math.sqrt(q.shape[-1]))
    dq = jnp.einsum(f"{logit_axes},{kv_axes}->{q_axes}", d_logits.astype(k.dtype), k)
    dk = _sum_over_queries(d_logits, q, axes).astype(k.dtype)
    dv = _sum_over_queries(probs, d_out, axes).astype(v.dtype)
    return dq.astype(q.dtype), dk, dv, None


softmax_attention.defvjp(_attention_fwd, _attention_bwd)
