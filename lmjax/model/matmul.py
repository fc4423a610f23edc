"""The weight matmul `x @ W` of every dense layer, with a weight gradient XLA's CPU backend runs fast.

The weight gradient contracts the token axes, the leading axes of both the layer's input and its
output cotangent. XLA's CPU compiler lays it out as a dot with both operands transposed, which its
fast matmul library (YNNPACK) does not take: it writes one operand transposed and falls back to its
generic dot, together ~2x the time of the layer's forward matmul. Here the backward pass on CPU
first writes the input with its token axes last (one small copy), which makes the weight gradient a
plain matmul. Elsewhere, and for the input gradient, the backward is exactly what autodiff gives.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DimensionNumbers = tuple[tuple[tuple[int, ...], tuple[int, ...]], tuple[tuple[int, ...], tuple[int, ...]]]


def _check(x: jax.Array, w: jax.Array, dimension_numbers: DimensionNumbers) -> int:
    """Number of the input's contracted (feature) axes: they must be its last ones and W's first."""
    (x_contract, w_contract), (x_batch, w_batch) = dimension_numbers
    n = len(x_contract)
    if x_batch or w_batch or tuple(x_contract) != tuple(range(x.ndim - n, x.ndim)) or tuple(w_contract) != tuple(range(n)):
        raise ValueError(f"weight_dot_general: expected x[..., in] @ W[in, out], got dimension numbers {dimension_numbers}")
    return n


def _materialized_transpose(x: jax.Array, axes: tuple[int, ...]) -> jax.Array:
    """`x.transpose(axes)` written to memory: a conditional is a boundary XLA's CPU layout
    assignment does not see through (the branches differ in form only, so JAX keeps both)."""
    return jax.lax.cond(
        jnp.isfinite(x.reshape(-1)[0]), lambda a: a.transpose(axes), lambda a: -(-a.transpose(axes)), x
    )


def _cpu_weight_grad(x: jax.Array, g: jax.Array, n: int) -> jax.Array:
    """dW[in, out] = sum over tokens of x[tokens, in] g[tokens, out], as an untransposed matmul."""
    tokens = x.ndim - n
    features_first = tuple(range(tokens, x.ndim)) + tuple(range(tokens))
    x_in_tokens = _materialized_transpose(x, features_first)
    contract = (tuple(range(n, x.ndim)), tuple(range(tokens)))
    return jax.lax.dot_general(x_in_tokens, g, (contract, ((), ())), preferred_element_type=g.dtype)


def _dot(x: jax.Array, w: jax.Array, n: int) -> jax.Array:
    return jax.lax.dot_general(x, w, ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))


def _dot_fwd(x: jax.Array, w: jax.Array, n: int):
    return _dot(x, w, n), (x, w)


def _dot_bwd(n: int, residuals, g: jax.Array):
    x, w = residuals
    _, autodiff = jax.vjp(lambda x, w: _dot(x, w, n), x, w)
    dx, _ = autodiff(g)
    dw = jax.lax.platform_dependent(
        x, g,
        cpu=lambda x, g: _cpu_weight_grad(x, g, n).astype(w.dtype),
        default=lambda x, g: jax.vjp(lambda w: _dot(x, w, n), w)[1](g)[0],
    )
    return dx, dw


_weight_dot = jax.custom_vjp(_dot, nondiff_argnums=(2,))
_weight_dot.defvjp(_dot_fwd, _dot_bwd)


def weight_dot_general(x, w, dimension_numbers, precision=None, preferred_element_type=None):
    """`jax.lax.dot_general(x, w, dimension_numbers)` for x[..., in] @ W[in, out]; the signature
    `flax.linen.Dense(dot_general=...)` calls."""
    if precision is not None or preferred_element_type is not None or not isinstance(w, jax.Array):
        # Explicit precisions, and weights that are not plain arrays (a quantized kernel), take
        # the library's own dot_general.
        return jax.lax.dot_general(
            x, w, dimension_numbers, precision=precision, preferred_element_type=preferred_element_type
        )
    return _weight_dot(x, w, _check(x, w, dimension_numbers))


def dot_general_for(cfg):
    """The dot_general for the dense layers of `config.model`: `weight_dot_general`, except under
    remat, where a custom VJP's saved inputs would escape the remat policy."""
    return weight_dot_general if cfg.remat == "none" else jax.lax.dot_general
