"""Compute-optimal scaling, Hoffmann et al. (2022) "Training Compute-Optimal Large Language Models".

Approach 2 (IsoFLOP profiles): for each compute budget C, fit a parabola of loss in log N; its
minimum is N_opt(C), and D_opt(C) = C / (6 N_opt). Power laws N_opt ~ C^a and D_opt ~ C^b follow
from a line through the minima in log-log space.

Approach 3 (parametric loss): L(N, D) = E + A / N^alpha + B / D^beta, fitted by minimizing the
Huber loss (delta = 1e-3) between log-predicted and log-observed losses, with the prediction in
its log-sum-exp form LSE(a - alpha log N, b - beta log D, e) where A = e^a, B = e^b, E = e^e. The
objective has many poor local minima, so L-BFGS starts from the paper's grid of 4,500
initializations and the best end point wins. All starts run at once (`lbfgs.minimize`) in float64.

Compute throughout is C = 6 N D with N the parameter count the caller passes (lmjax sweeps pass
non-embedding parameters) and D the training tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.scaling import lbfgs
from lmjax.scaling.kaplan import PowerLaw

HUBER_DELTA = 1e-3
# The initialization grid of Hoffmann et al. (2022), appendix D.2: 6 x 6 x 5 x 5 x 5 = 4,500 starts.
GRID_A = np.arange(0.0, 30.0, 5.0)  # log A
GRID_B = np.arange(0.0, 30.0, 5.0)  # log B
GRID_E = np.arange(-1.0, 1.5, 0.5)  # log E
GRID_ALPHA = np.arange(0.0, 2.5, 0.5)
GRID_BETA = np.arange(0.0, 2.5, 0.5)


# --- approach 2 ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class IsoFlopFit:
    """Approach 2: one parabola per budget, and power laws through their minima."""

    budgets: np.ndarray  # C of each IsoFLOP profile
    parabolas: np.ndarray  # [budgets, 3]: loss = p0 (log N)^2 + p1 log N + p2
    n_opt: np.ndarray  # argmin of each parabola
    d_opt: np.ndarray  # C / (6 n_opt)
    loss_opt: np.ndarray  # the parabola's minimum
    n_law: PowerLaw  # N_opt = n_law(C): n_law.exponent is a
    d_law: PowerLaw  # D_opt = d_law(C): d_law.exponent is b
    skipped: dict = dataclasses.field(default_factory=dict)  # budget -> why its profile was left out
    fit_ranges: np.ndarray | None = None  # [budgets, 2]: smallest and largest N each parabola saw


def fit_isoflop(
    budgets: Sequence[float], n_params: Sequence[float], losses: Sequence[float], strict: bool = True,
    window: int | None = None,
) -> IsoFlopFit:
    """Approach 2 from runs tagged with the budget C of their IsoFLOP profile.

    `window`: fit each parabola to only this many sizes (at least 3), centred on the size with the
    lowest loss. Far from the optimum a profile stops being a parabola in log N (the largest models of
    a small budget get so few steps that they all sit near the unigram loss), and those tails would
    drag the vertex away; None fits every size, as Hoffmann et al. do with profiles sampled near
    their minima.

    A profile whose parabola is not convex, or whose minimum lies outside the sizes it was fitted to,
    says nothing reliable about N_opt: `strict` raises on it; otherwise it is left out and named in
    `skipped` (the remaining profiles must still number at least two).
    """
    budgets, n_params, losses = (np.asarray(v, np.float64) for v in (budgets, n_params, losses))
    if window is not None and window < 3:
        raise ValueError(f"window={window}: a parabola needs at least 3 sizes")
    rows, skipped = [], {}
    for c in np.unique(budgets):
        pick = budgets == c
        if pick.sum() < 3:
            raise ValueError(f"IsoFLOP budget C={c:.3g} has {pick.sum()} runs; a parabola needs at least 3")
        order = np.argsort(n_params[pick])
        n_c, loss_c = n_params[pick][order], losses[pick][order]
        if window is not None and window < len(n_c):
            start = int(np.clip(np.argmin(loss_c) - window // 2, 0, len(n_c) - window))
            n_c, loss_c = n_c[start:start + window], loss_c[start:start + window]
        log_n_sampled = np.log(n_c)
        p = np.polyfit(log_n_sampled, loss_c, 2)
        problem = None
        if p[0] <= 0:
            problem = (f"IsoFLOP budget C={c:.3g}: loss is not convex in log N (curvature {p[0]:.3g}); "
                       "widen the range of model sizes so the minimum lies inside it")
        elif not log_n_sampled.min() <= -p[1] / (2 * p[0]) <= log_n_sampled.max():
            problem = (f"IsoFLOP budget C={c:.3g}: the parabola's minimum N={np.exp(-p[1] / (2 * p[0])):.3g} lies "
                       f"outside the sizes it was fitted to [{n_c.min():.3g}, {n_c.max():.3g}]")
        if problem:
            if strict:
                raise ValueError(problem)
            skipped[float(c)] = problem
            continue
        log_n = -p[1] / (2 * p[0])
        rows.append((c, p, np.exp(log_n), np.polyval(p, log_n), (n_c.min(), n_c.max())))
    if len(rows) < 2:
        raise ValueError("approach 2 needs at least 2 compute budgets with a minimum inside their sizes to fit "
                         f"N_opt(C); left out: {list(skipped.values()) or 'none'}")
    c, p, n_opt, loss_opt, ranges = (np.array(v) for v in zip(*rows))
    d_opt = c / (6 * n_opt)
    return IsoFlopFit(c, p, n_opt, d_opt, loss_opt, _growth_law(c, n_opt), _growth_law(c, d_opt), skipped, ranges)


def _growth_law(c: np.ndarray, y: np.ndarray) -> PowerLaw:
    """y = k C^a. Stored as a PowerLaw with exponent a (positive for a growing quantity)."""
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return PowerLaw(scale=float(np.exp(intercept)), exponent=float(slope), form="k*x^a")


# --- approach 3 ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ParametricFit:
    """Approach 3: L(N, D) = E + A / N^alpha + B / D^beta."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float  # summed Huber loss at the optimum
    num_starts: int
    fit_time_s: float  # the 4,500-start fit, compilation included, bootstrap excluded
    intervals: dict[str, tuple[float, float]] | None = None  # bootstrap (lo, hi) per parameter
    replicates: np.ndarray | None = None  # [bootstrap, 5]: (E, A, B, alpha, beta) of each resample's fit

    def predict(self, n_params, n_tokens):
        """Loss of N parameters trained on D tokens (arrays broadcast)."""
        n, d = np.asarray(n_params, np.float64), np.asarray(n_tokens, np.float64)
        return self.E + self.A / n ** self.alpha + self.B / d ** self.beta

    def compute_optimal(self, flops):
        """(N_opt, D_opt) minimizing L under 6 N D = C (Hoffmann et al. eq. 4)."""
        c = np.asarray(flops, np.float64) / 6
        a, b = self.alpha, self.beta
        g = (a * self.A / (b * self.B)) ** (1 / (a + b))
        return g * c ** (b / (a + b)), c ** (a / (a + b)) / g

    def tokens_per_param(self, flops):
        n, d = self.compute_optimal(flops)
        return d / n


def initial_grid() -> np.ndarray:
    """[4500, 5] starts in the optimized coordinates (log A, log B, log E, alpha, beta)."""
    return np.array(list(itertools.product(GRID_A, GRID_B, GRID_E, GRID_ALPHA, GRID_BETA)), np.float64)


def _huber(r: jax.Array, delta: float) -> jax.Array:
    a = jnp.abs(r)
    return jnp.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _make_objective(log_n: jax.Array, log_d: jax.Array, log_loss: jax.Array, delta: float):
    def objective(x_P: jax.Array, *weights: jax.Array) -> jax.Array:
        """Summed Huber loss of log L; `weights` (per run, optional) are bootstrap counts."""
        a, b, e, alpha, beta = x_P
        x, y = a - alpha * log_n, b - beta * log_d
        top = jnp.maximum(jnp.maximum(x, y), e)  # log-sum-exp, written out: 3 terms, all finite
        predicted = top + jnp.log(jnp.exp(x - top) + jnp.exp(y - top) + jnp.exp(e - top))
        losses = _huber(predicted - log_loss, delta)
        return jnp.sum(weights[0] * losses) if weights else jnp.sum(losses)
    return objective


def _solve(log_n, log_d, log_loss, starts: np.ndarray, weights: np.ndarray | None, delta: float, iters: int):
    """Run every start (each with its own data weights, if given); returns (x [S, 5], f [S]) as numpy."""
    with jax.enable_x64(True):
        objective = _make_objective(*(jnp.asarray(v, jnp.float64) for v in (log_n, log_d, log_loss)), delta)
        extra = () if weights is None else (jnp.asarray(weights, jnp.float64),)
        run = jax.jit(lambda x, *w: lbfgs.minimize(objective, x, *w, iters=iters))
        x, f = run(jnp.asarray(starts, jnp.float64), *extra)
        x, f = np.asarray(x), np.asarray(f)
    f = np.where(np.isfinite(f), f, np.inf)
    return x, f


def fit_parametric(n_params: Sequence[float], n_tokens: Sequence[float], losses: Sequence[float], *,
                   delta: float = HUBER_DELTA, iters: int = 100, bootstrap: int = 0,
                   seed: int = 0) -> ParametricFit:
    """Approach 3 fit from the full 4,500-start grid; `bootstrap` > 0 adds 90% intervals.

    Each bootstrap replicate resamples the runs with replacement (as integer weights on the data)
    and is refitted from the best full-data solution and the 20 best distinct grid end points, all
    replicates in one batched L-BFGS run.
    """
    arrays = [np.asarray(v, np.float64) for v in (n_params, n_tokens, losses)]
    if not (arrays[0].shape == arrays[1].shape == arrays[2].shape) or arrays[0].ndim != 1:
        raise ValueError(f"n_params, n_tokens and losses must be 1-D and equally long, got "
                         f"{', '.join(str(a.shape) for a in arrays)}")
    if not all(np.all(np.isfinite(a) & (a > 0)) for a in arrays):
        raise ValueError("n_params, n_tokens and losses must be finite and positive (the fit is in log space)")
    log_n, log_d, log_loss = (np.log(a) for a in arrays)
    if log_n.size <= 5:
        raise ValueError(f"approach 3 has 5 parameters and needs more than 5 runs, got {log_n.size}")
    start = time.perf_counter()
    starts = initial_grid()
    x, f = _solve(log_n, log_d, log_loss, starts, None, delta, iters)
    best = int(np.argmin(f))
    elapsed = time.perf_counter() - start
    intervals = replicates = None
    if bootstrap:
        replicates = _bootstrap(log_n, log_d, log_loss, x, f, bootstrap, seed, delta, iters)
        lo, hi = np.percentile(replicates, [5, 95], axis=0)
        intervals = {name: (float(l), float(h)) for name, l, h in zip(("E", "A", "B", "alpha", "beta"), lo, hi)}
    return ParametricFit(*_params(x[best]), objective=float(f[best]), num_starts=len(starts),
                         fit_time_s=elapsed, intervals=intervals, replicates=replicates)


def _params(x: np.ndarray) -> tuple[float, ...]:
    """(E, A, B, alpha, beta) from the optimized coordinates (log A, log B, log E, alpha, beta)."""
    return float(np.exp(x[2])), float(np.exp(x[0])), float(np.exp(x[1])), float(x[3]), float(x[4])


def _bootstrap(log_n, log_d, log_loss, x, f, replicates, seed, delta, iters):
    """(E, A, B, alpha, beta) fitted to each of `replicates` resamples of the runs: [replicates, 5]."""
    order = np.argsort(f)
    candidates = [x[order[0]]]
    for i in order[1:]:
        if len(candidates) == 21:
            break
        if all(np.max(np.abs(x[i] - c)) > 1e-3 for c in candidates):
            candidates.append(x[i])
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(rng.integers(0, log_n.size, log_n.size), minlength=log_n.size)
                       for _ in range(replicates)]).astype(np.float64)
    k = len(candidates)
    starts = np.tile(np.stack(candidates), (replicates, 1))
    xs, fs = _solve(log_n, log_d, log_loss, starts, np.repeat(counts, k, axis=0), delta, iters)
    best = xs.reshape(replicates, k, -1)[np.arange(replicates), np.argmin(fs.reshape(replicates, k), 1)]
    return np.array([_params(row) for row in best])
