"""Chinchilla approach 1 (Hoffmann et al. 2022): the envelope of minimal loss over training curves.

Every logged point of every run is a model of N parameters that has seen D tokens, at compute
C = 6 N D. Over log-spaced bins of C, the point with the lowest loss in each bin is the best model
found for that compute: its N and D are N_opt(C) and D_opt(C), and lines through them in log-log
space give N_opt ~ C^a and D_opt ~ C^b (a + b = 1 when every point has C = 6 N D exactly). The
lowest losses themselves give the frontier L(C) = (C_c / C)^alpha, which is what approach 1 says
about the loss at a budget it has not run.

A bin only speaks for N_opt when models of at least `min_sizes` sizes reach it, and not when its
winner is the smallest or largest size in it: the optimum may lie beyond the sizes that reached it
(a larger model's curve may not reach down to that compute once its warmup is left out), so with
edges dropped a bin needs three sizes.
Intermediate points of a run trained on a decaying (cosine) schedule are worse than a run of that
length would be; WSD decay points and final points are not, which is why callers pass them too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from lmjax.scaling import kaplan
from lmjax.scaling.kaplan import PowerLaw


@dataclasses.dataclass(frozen=True)
class EnvelopeFit:
    """Approach 1: the winners of each compute bin, and power laws through them."""

    flops: np.ndarray  # C of each bin's winning point
    n_opt: np.ndarray  # its N
    d_opt: np.ndarray  # its D
    loss_opt: np.ndarray  # its loss
    n_law: PowerLaw  # N_opt = n_law(C): exponent a
    d_law: PowerLaw  # D_opt = d_law(C): exponent b
    loss_law: PowerLaw  # L(C) = (C_c / C)^alpha through the winners
    num_points: int  # curve points the envelope was taken over

    def optimum(self, flops) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N_opt, D_opt, loss) the power laws give at compute C."""
        return self.n_law(flops), self.d_law(flops), self.loss_law(flops)


def fit_envelope(n_params: Sequence[float], n_tokens: Sequence[float], losses: Sequence[float], *,
                 num_bins: int = 30, min_sizes: int = 2, drop_edge_sizes: bool = True) -> EnvelopeFit:
    """Approach 1 from curve points (N, D, loss), pooled over all runs."""
    n, d, loss = (np.asarray(v, np.float64).ravel() for v in (n_params, n_tokens, losses))
    if not n.shape == d.shape == loss.shape:
        raise ValueError(f"n_params, n_tokens and losses must be equally long, got {n.shape}, {d.shape}, {loss.shape}")
    keep = np.isfinite(loss) & (loss > 0) & (n > 0) & (d > 0)
    n, d, loss = n[keep], d[keep], loss[keep]
    sizes = np.unique(n)
    if sizes.size < 3:
        raise ValueError(f"approach 1 needs training curves of at least 3 model sizes, got {sizes.size}")
    c = 6 * n * d
    edges = np.geomspace(c.min(), c.max() * (1 + 1e-12), num_bins + 1)
    bin_of = np.clip(np.searchsorted(edges, c, side="right") - 1, 0, num_bins - 1)
    winners = []
    for b in range(num_bins):
        members = np.flatnonzero(bin_of == b)
        if members.size == 0 or np.unique(n[members]).size < min_sizes:
            continue
        best = members[np.argmin(loss[members])]
        if drop_edge_sizes and n[best] in (n[members].min(), n[members].max()):
            continue
        winners.append(best)
    if len(winners) < 3:
        raise ValueError(f"approach 1: only {len(winners)} compute bins have a winner inside the sizes tried "
                         f"(need 3); the curves overlap too little in compute, or the optimum lies outside "
                         f"[{sizes[0]:.3g}, {sizes[-1]:.3g}] (or the sizes that reach each compute)")
    w = np.array(winners)
    c_w, n_w, d_w, loss_w = c[w], n[w], d[w], loss[w]
    return EnvelopeFit(c_w, n_w, d_w, loss_w, growth_law(c_w, n_w), growth_law(c_w, d_w),
                       kaplan.fit_power_law(c_w, loss_w), int(n.size))


def growth_law(c: np.ndarray, y: np.ndarray) -> PowerLaw:
    """y = k C^a by least squares in log-log space (a positive for a quantity that grows with C)."""
    slope, intercept = np.polyfit(np.log(c), np.log(y), 1)
    return PowerLaw(scale=float(np.exp(intercept)), exponent=float(slope), form="k*x^a")
