"""Kaplan et al. (2020) power laws: L(N) = (N_c / N)^alpha_N, L(D) = (D_c / D)^alpha_D, and
L(C_min) = (C_c / C_min)^alpha_C, each a straight line in log-log space fitted by least squares.

The paper's laws hold on the frontier: L(N) for models trained close to convergence, L(D) for the
largest models, L(C_min) for the best model at each compute. `frontier` picks those points out of
a sweep (the lowest loss at each x, keeping only points that beat every smaller x), so the same fit
serves all three. N is the non-embedding parameter count, as in the paper.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class PowerLaw:
    """`form` 'Lc' is L = (scale / x)^exponent (a loss falling with x); 'k*x^a' is y = scale * x^exponent."""

    scale: float
    exponent: float
    form: str = "Lc"

    def __call__(self, x):
        x = np.asarray(x, np.float64)
        if self.form == "Lc":
            return (self.scale / x) ** self.exponent
        return self.scale * x ** self.exponent

    def __str__(self) -> str:
        if self.form == "Lc":
            return f"L = ({self.scale:.3g} / x)^{self.exponent:.3f}"
        return f"y = {self.scale:.3g} * x^{self.exponent:.3f}"


def fit_power_law(x: Sequence[float], loss: Sequence[float]) -> PowerLaw:
    """L = (x_c / x)^alpha by least squares on log L = alpha log x_c - alpha log x."""
    x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
    if x.shape != loss.shape or x.size < 2:
        raise ValueError(f"need at least 2 (x, loss) pairs of equal length, got {x.shape} and {loss.shape}")
    if np.any(x <= 0) or np.any(loss <= 0):
        raise ValueError("power-law fits take logs: x and loss must be positive")
    if np.unique(x).size < 2:
        raise ValueError("all x are equal: a power law in x needs at least two distinct values")
    slope, intercept = np.polyfit(np.log(x), np.log(loss), 1)
    alpha = -slope
    if alpha <= 0:
        raise ValueError(f"loss does not fall with x (fitted exponent {alpha:.3g}); nothing to fit")
    return PowerLaw(scale=float(np.exp(intercept / alpha)), exponent=float(alpha))


def frontier(x: Sequence[float], loss: Sequence[float], rel_tol: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """The lower envelope: the lowest loss of each x, kept only if below all smaller x's.

    x values within `rel_tol` of each other count as one (the runs of one IsoFLOP budget differ in
    compute by a rounded step or two), so the envelope does not zigzag within a budget.
    """
    x, loss = np.asarray(x, np.float64), np.asarray(loss, np.float64)
    order = np.argsort(x, kind="stable")
    groups: list[list[int]] = []
    for i in order:
        if groups and x[i] <= x[groups[-1][0]] * (1 + rel_tol):
            groups[-1].append(i)
        else:
            groups.append([i])
    xs, best = [], []
    for group in groups:
        i = min(group, key=lambda j: loss[j])
        if not best or loss[i] < best[-1]:
            xs.append(x[i])
            best.append(loss[i])
    return np.array(xs), np.array(best)


def fit_loss_vs_params(n_params, loss) -> PowerLaw:
    """L(N): the best loss reached by each model size."""
    return fit_power_law(*frontier(n_params, loss))


def fit_loss_vs_tokens(n_tokens, loss) -> PowerLaw:
    """L(D): the best loss reached with each token count."""
    return fit_power_law(*frontier(n_tokens, loss))


def fit_loss_vs_compute(flops, loss) -> PowerLaw:
    """L(C_min): the compute-efficient frontier, C = 6 N D."""
    return fit_power_law(*frontier(flops, loss))
