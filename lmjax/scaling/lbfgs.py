"""A batched L-BFGS: thousands of independent small minimizations advanced in lockstep.

Why not `optax.lbfgs` under `jax.vmap`: its zoom line search is a `while_loop`, and a vmapped
while loop runs until the slowest of the 4,500 starts is done, through a state machine of many
small ops, several times slower than this scheme on a CPU. Here every iteration costs exactly one batched
value-and-gradient plus one batched evaluation of a fixed ladder of step sizes (1, 1/2, 1/4, ...),
of which each start takes the longest that satisfies the Armijo condition. No data-dependent
control flow, so the whole run is one `lax.scan` that XLA compiles once.

Each start keeps its own curvature history (two-loop recursion, Nocedal & Wright Alg. 7.4). A pair
(s, y) with s.y <= 0 is not stored; a direction that is not a descent direction falls back to the
negative gradient, cut to unit length (as is the first step, before any curvature is known); and a
start that finds no Armijo step stays put: no start's objective ever increases, even at the kinks
of a Huber loss.

Shape letters: S starts, P parameters, M stored (s, y) pairs, T step sizes in the ladder.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def minimize(fun: Callable[..., jax.Array], x0_SxP: jax.Array, *args_S: jax.Array,
             iters: int = 100, memory: int = 10, ladder: int = 10) -> tuple[jax.Array, jax.Array]:
    """Minimize `fun(x_P, *args) -> scalar` from each of S starts; returns (x_SxP, f_S).

    `args_S` are arrays with a leading axis of S: per-start data (bootstrap weights, for example).
    Shared data belongs in `fun`'s closure. Call under `jax.jit`; dtype follows `x0_SxP`.
    """
    S, P = x0_SxP.shape
    value_and_grad = jax.vmap(jax.value_and_grad(fun))
    ladder_value = jax.vmap(jax.vmap(fun, in_axes=(0,) + (None,) * len(args_S)))
    steps_T = 0.5 ** jnp.arange(ladder, dtype=x0_SxP.dtype)

    def direction(g_SxP, s_SxMxP, y_SxMxP, rho_SxM, k):
        """-H g by the two-loop recursion over the newest min(k, memory) stored pairs."""
        def newest_first(i):
            return (k - 1 - i) % memory

        def backward(i, carry):
            q, alpha_SxM = carry
            j = newest_first(i)
            a = jnp.where(i < k, rho_SxM[:, j] * jnp.sum(s_SxMxP[:, j] * q, -1), 0.0)
            return q - a[:, None] * y_SxMxP[:, j], alpha_SxM.at[:, j].set(a)

        q, alpha_SxM = jax.lax.fori_loop(0, memory, backward, (g_SxP, jnp.zeros_like(rho_SxM)))
        j = newest_first(0)
        sy = jnp.sum(s_SxMxP[:, j] * y_SxMxP[:, j], -1)
        yy = jnp.sum(y_SxMxP[:, j] ** 2, -1)
        gamma = jnp.where((k > 0) & (yy > 0), sy / jnp.where(yy > 0, yy, 1.0), _cautious_scale(g_SxP))

        def forward(i, r):
            j = newest_first(memory - 1 - i)
            b = rho_SxM[:, j] * jnp.sum(y_SxMxP[:, j] * r, -1)
            return r + jnp.where(memory - 1 - i < k, alpha_SxM[:, j] - b, 0.0)[:, None] * s_SxMxP[:, j]

        return -jax.lax.fori_loop(0, memory, forward, gamma[:, None] * q)

    def step(carry, _):
        x, f, g, s_hist, y_hist, rho, k = carry
        d = direction(g, s_hist, y_hist, rho, k)
        slope = jnp.sum(g * d, -1)
        descent = slope < 0
        fallback = -_cautious_scale(g)[:, None] * g
        d = jnp.where(descent[:, None], d, fallback)
        slope = jnp.where(descent, slope, jnp.sum(g * fallback, -1))

        trial_SxTxP = x[:, None, :] + steps_T[None, :, None] * d[:, None, :]
        f_SxT = ladder_value(trial_SxTxP, *args_S)
        armijo = f_SxT <= f[:, None] + 1e-4 * steps_T[None, :] * slope[:, None]
        t = jnp.where(jnp.any(armijo, 1), steps_T[jnp.argmax(armijo, 1)], 0.0)

        x_new = x + t[:, None] * d
        f_new, g_new = value_and_grad(x_new, *args_S)
        s, y = x_new - x, g_new - g
        sy = jnp.sum(s * y, -1)
        keep = sy > 1e-10 * jnp.sqrt(jnp.sum(s * s, -1) * jnp.sum(y * y, -1))
        j = k % memory
        s_hist = s_hist.at[:, j].set(jnp.where(keep[:, None], s, s_hist[:, j]))
        y_hist = y_hist.at[:, j].set(jnp.where(keep[:, None], y, y_hist[:, j]))
        rho = rho.at[:, j].set(jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), rho[:, j]))
        return (x_new, f_new, g_new, s_hist, y_hist, rho, k + 1), None

    f0, g0 = value_and_grad(x0_SxP, *args_S)
    zeros = jnp.zeros((S, memory, P), x0_SxP.dtype)
    init = (x0_SxP, f0, g0, zeros, zeros, jnp.zeros((S, memory), x0_SxP.dtype), 0)
    (x, f, *_), _ = jax.lax.scan(step, init, None, length=iters)
    return x, f


def _cautious_scale(g_SxP: jax.Array) -> jax.Array:
    """min(1, 1/|g|): a steepest-descent step no longer than 1, so the ladder's first rung is a
    sensible trial even where the gradient is huge (an initial point far from the optimum)."""
    norm = jnp.sqrt(jnp.sum(g_SxP * g_SxP, -1))
    return 1.0 / jnp.maximum(norm, 1.0)
