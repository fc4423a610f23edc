"""What each Chinchilla approach predicts for a compute budget: N_opt, D_opt and the loss, with intervals.

A scaling law earns its keep on a budget nobody has run. The three approaches answer differently:
- approach 1 (`envelope.EnvelopeFit`): N_opt and D_opt from its power laws in C, the loss from the
  power law L(C) = (C_c / C)^alpha through the envelope's minima;
- approach 2 (`chinchilla.IsoFlopFit`): N_opt and D_opt from its power laws in C, the loss from the
  same kind of power law through the parabolas' minima (one per budget);
- approach 3 (`chinchilla.ParametricFit`): N_opt and D_opt minimizing L(N, D) under 6 N D = C, and
  L(N_opt, D_opt) itself.
Intervals are 90% percentile intervals over bootstrap refits, each on the runs resampled with
replacement (whole runs: the points of one training curve are not independent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmjax.scaling import kaplan
from lmjax.scaling.chinchilla import IsoFlopFit, ParametricFit
from lmjax.scaling.envelope import EnvelopeFit

QUANTITIES = ("a", "b", "n_opt", "d_opt", "loss")
LOSS_FROM = {
    "approach 1": "L(C) power law through the envelope's minima",
    "approach 2": "L(C) power law through the IsoFLOP parabolas' minima",
    "approach 3": "L(N_opt, D_opt) of the parametric law",
}


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One approach's compute-optimal answer at `flops`, and 90% intervals when bootstrapped."""

    approach: str
    flops: float
    a: float  # N_opt ~ C^a
    b: float  # D_opt ~ C^b
    n_opt: float
    d_opt: float
    loss: float
    loss_from: str
    intervals: dict[str, tuple[float, float]] = dataclasses.field(default_factory=dict)  # QUANTITIES -> (lo, hi)
    replicates: int = 0  # bootstrap refits that succeeded


def optimum(fit: EnvelopeFit | IsoFlopFit | ParametricFit, flops: float) -> tuple[float, float, float]:
    """(N_opt, D_opt, loss) that one fit predicts at compute C."""
    if isinstance(fit, EnvelopeFit):
        n, d, loss = fit.optimum(flops)
    elif isinstance(fit, IsoFlopFit):
        n, d = fit.n_law(flops), fit.d_law(flops)
        loss = kaplan.fit_power_law(fit.budgets, fit.loss_opt)(flops)
    elif isinstance(fit, ParametricFit):
        n, d = fit.compute_optimal(flops)
        loss = fit.predict(n, d)
    else:
        raise TypeError(f"no compute-optimal prediction for a {type(fit).__name__}")
    return float(n), float(d), float(loss)


def exponents(fit: EnvelopeFit | IsoFlopFit | ParametricFit) -> tuple[float, float]:
    """(a, b) of N_opt ~ C^a, D_opt ~ C^b."""
    if isinstance(fit, ParametricFit):
        return fit.beta / (fit.alpha + fit.beta), fit.alpha / (fit.alpha + fit.beta)
    return fit.n_law.exponent, fit.d_law.exponent


def parametric_replicates(fit: ParametricFit) -> list[ParametricFit]:
    """The bootstrap refits `fit_parametric(..., bootstrap=R)` kept, as fits."""
    if fit.replicates is None:
        return []
    return [dataclasses.replace(fit, E=e, A=a, B=b, alpha=al, beta=be, intervals=None, replicates=None)
            for e, a, b, al, be in fit.replicates]


def bootstrap_fits(fit_runs: Callable[[np.ndarray], Any], num_runs: int, replicates: int, seed: int = 0,
                   strata: Sequence | None = None) -> list[Any]:
    """`fit_runs(indices)` on `replicates` resamples of run indices 0..num_runs-1 (with replacement,
    within each stratum if given, e.g. each IsoFLOP budget); resamples the fit rejects (ValueError)
    are left out."""
    rng = np.random.default_rng(seed)
    strata = np.zeros(num_runs) if strata is None else np.asarray(strata)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    fits = []
    for _ in range(replicates):
        picked = np.concatenate([rng.choice(g, size=g.size, replace=True) for g in groups])
        try:
            fits.append(fit_runs(np.sort(picked)))
        except (ValueError, np.linalg.LinAlgError):
            continue
    return fits


def predict(approach: str, fit: Any, flops: float, replicate_fits: Sequence[Any] = ()) -> Prediction:
    """The prediction of `fit` at `flops`, with intervals from `replicate_fits` (at least 2 needed)."""
    a, b = exponents(fit)
    n, d, loss = optimum(fit, flops)
    intervals = {}
    if len(replicate_fits) >= 2:
        values = np.array([[*exponents(f), *optimum(f, flops)] for f in replicate_fits])
        values = values[np.all(np.isfinite(values), axis=1)]
        lo, hi = np.percentile(values, [5, 95], axis=0)
        intervals = {q: (float(l), float(h)) for q, l, h in zip(QUANTITIES, lo, hi)}
    return Prediction(approach, float(flops), float(a), float(b), n, d, loss, LOSS_FROM.get(approach, ""),
                      intervals, len(replicate_fits))


def table(predictions: Sequence[Prediction]) -> str:
    """The approaches side by side (markdown), each value with its interval when there is one."""
    def cell(p: Prediction, q: str, fmt: str) -> str:
        value = format(getattr(p, q), fmt)
        if q in p.intervals:
            lo, hi = p.intervals[q]
            value += f" [{lo:{fmt}}, {hi:{fmt}}]"
        return value

    c = predictions[0].flops if predictions else 0.0
    lines = [f"| approach | N_opt ~ C^a | D_opt ~ C^b | N_opt at C={c:.3g} | D_opt | D/N | loss |",
             "|---|---|---|---|---|---|---|"]
    for p in predictions:
        lines.append(f"| {p.approach} | {cell(p, 'a', '.3f')} | {cell(p, 'b', '.3f')} | {cell(p, 'n_opt', '.3g')} | "
                     f"{cell(p, 'd_opt', '.3g')} | {p.d_opt / p.n_opt:.1f} | {cell(p, 'loss', '.4f')} |")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Measured:
    """The compute-optimal model found by runs at the predicted budget: what a prediction is scored on."""

    flops: float
    n_opt: float
    loss: float
    how: str


def measured_optimum(flops: float, n_params: Sequence[float], losses: Sequence[float]) -> Measured:
    """The minimum of a parabola in log N through runs of one budget (approach 2's estimate of
    N_opt), or the lowest-loss run when the parabola has no minimum inside the sizes run."""
    n, loss = np.asarray(n_params, np.float64), np.asarray(losses, np.float64)
    if n.size == 0:
        raise ValueError(f"no runs at C={flops:.3g} to measure the optimum with")
    best = int(np.argmin(loss))
    if np.unique(n).size >= 3:
        p = np.polyfit(np.log(n), loss, 2)
        vertex = -p[1] / (2 * p[0]) if p[0] > 0 else np.nan
        if np.log(n).min() <= vertex <= np.log(n).max():
            return Measured(flops, float(np.exp(vertex)), float(np.polyval(p, vertex)),
                            f"parabola in log N through {n.size} runs")
    return Measured(flops, float(n[best]), float(loss[best]), f"the lowest-loss run of {n.size}")


def scored(predictions: Sequence[Prediction], measured: Measured) -> str:
    """Predicted vs measured N_opt and loss, per approach (markdown)."""
    lines = ["| approach | N_opt predicted | measured | predicted / measured | loss predicted | measured | error |",
             "|---|---|---|---|---|---|---|"]
    for p in predictions:
        lines.append(f"| {p.approach} | {p.n_opt:.3g} | {measured.n_opt:.3g} | {p.n_opt / measured.n_opt:.2f} | "
                     f"{p.loss:.4f} | {measured.loss:.4f} | {p.loss - measured.loss:+.4f} |")
    return "\n".join(lines)
