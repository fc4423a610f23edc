"""The scaling-law figures.

Each function takes the fits from `kaplan` / `chinchilla` plus the raw points and returns a
matplotlib Figure; `save` writes one as a PNG. Figures are built with `matplotlib.figure.Figure`,
not pyplot, so no display or GUI backend is involved (headless machines, TPU VMs) and a notebook's
own backend is left alone. Colours run with the compute budget, as in Hoffmann et al. fig. 3.
"""

from __future__ import annotations

import os

import matplotlib
import matplotlib.ticker
import numpy as np
from matplotlib.figure import Figure

from lmjax.scaling.chinchilla import IsoFlopFit, ParametricFit
from lmjax.scaling.envelope import EnvelopeFit
from lmjax.scaling.kaplan import PowerLaw, frontier


def _subplots(ncols: int = 1, figsize=(6, 4.5)):
    fig = Figure(figsize=figsize)
    return fig, fig.subplots(1, ncols)


def _finish(fig):
    """Readable log axes (ticks at 1-9, 1/2/5 or 1 x 10^k by the span, labelled like 2e+11), tight layout."""
    for ax in fig.axes:
        for axis, scale, (lo, hi) in ((ax.xaxis, ax.get_xscale(), ax.get_xlim()), (ax.yaxis, ax.get_yscale(), ax.get_ylim())):
            if scale != "log" or lo <= 0:
                continue
            span = np.log10(hi / lo)
            subs = np.arange(1.0, 10.0) if span < 1 else (1.0, 2.0, 5.0) if span < 3 else (1.0,)
            axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}"))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    return fig


def _budget_colours(budgets: np.ndarray):
    cmap = matplotlib.colormaps["viridis"]
    return {c: cmap(0.85 * i / max(len(budgets) - 1, 1)) for i, c in enumerate(budgets)}  # no pale yellow


def isoflop_curves(budgets, n_params, losses, fit: IsoFlopFit):
    """Loss vs N for each budget, the fitted parabola (in log N) and its minimum."""
    budgets, n_params, losses = (np.asarray(v, np.float64) for v in (budgets, n_params, losses))
    fig, ax = _subplots()
    colours = _budget_colours(np.unique(budgets))
    for c in sorted(set(np.unique(budgets)) - set(fit.budgets)):  # profiles approach 2 left out
        pick = budgets == c
        ax.scatter(n_params[pick], losses[pick], facecolor="none", edgecolor=colours[c],
                   label=f"C = {c:.1e} (left out)")
    for i, (c, p, n_opt, l_opt) in enumerate(zip(fit.budgets, fit.parabolas, fit.n_opt, fit.loss_opt)):
        pick = budgets == c
        ax.scatter(n_params[pick], losses[pick], color=colours[c], label=f"C = {c:.1e}")
        lo, hi = fit.fit_ranges[i] if fit.fit_ranges is not None else (n_params[pick].min(), n_params[pick].max())
        log_n = np.linspace(np.log(lo) - 0.2, np.log(hi) + 0.2, 100)  # the parabola where it was fitted
        ax.plot(np.exp(log_n), np.polyval(p, log_n), color=colours[c], alpha=0.7)
        ax.scatter([n_opt], [l_opt], color=colours[c], marker="*", s=200, edgecolor="k", zorder=3)
    ax.set(xscale="log", xlabel="parameters N", ylabel="loss",
           title="IsoFLOP profiles (stars: fitted minima)")
    ax.legend(fontsize=8)
    return _finish(fig)


def loss_vs_compute(flops, losses, law: PowerLaw | None = None):
    """Every run's loss against C = 6 N D, the frontier, and the L(C_min) law."""
    flops, losses = np.asarray(flops, np.float64), np.asarray(losses, np.float64)
    fig, ax = _subplots()
    ax.scatter(flops, losses, color="0.6", s=15, label="runs")
    fx, fl = frontier(flops, losses)
    ax.plot(fx, fl, "o-", color="C3", label="frontier")
    if law is not None:
        xs = np.geomspace(flops.min(), flops.max() * 3, 100)
        ax.plot(xs, law(xs), "--", color="k", label=f"L(C) ~ C^-{law.exponent:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND, N non-embedding (FLOPs)", ylabel="loss",
           title="Loss vs compute")
    ax.legend(fontsize=8)
    return _finish(fig)


def optimal_allocation(fit: IsoFlopFit, parametric: ParametricFit | None = None):
    """N_opt(C) and D_opt(C): approach 2 minima with their power laws, and approach 3's prediction."""
    fig, axes = _subplots(2, figsize=(10, 4))
    xs = np.geomspace(fit.budgets.min() / 3, fit.budgets.max() * 3, 100)
    for ax, points, law, label in ((axes[0], fit.n_opt, fit.n_law, "N_opt"), (axes[1], fit.d_opt, fit.d_law, "D_opt")):
        ax.scatter(fit.budgets, points, color="C0", zorder=3, label="approach 2 minima")
        ax.plot(xs, law(xs), color="C0", label=f"{label} ~ C^{law.exponent:.3f}")
        if parametric is not None:
            n3, d3 = parametric.compute_optimal(xs)
            ax.plot(xs, n3 if label == "N_opt" else d3, "--", color="C1", label="approach 3")
        ax.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel=label)
        ax.legend(fontsize=8)
    return _finish(fig)


def loss_contours(fit: ParametricFit, n_params, n_tokens, flops_lines=()):
    """L(N, D) of the parametric fit as contours over the sweep's range, the runs, and the
    compute-optimal path; optional IsoFLOP lines D = C / (6N)."""
    n_params, n_tokens = np.asarray(n_params, np.float64), np.asarray(n_tokens, np.float64)
    ns = np.geomspace(n_params.min() / 3, n_params.max() * 3, 120)
    ds = np.geomspace(n_tokens.min() / 3, n_tokens.max() * 3, 120)
    nn, dd = np.meshgrid(ns, ds)
    fig, ax = _subplots()
    cs = ax.contourf(nn, dd, fit.predict(nn, dd), levels=20, cmap="viridis")
    fig.colorbar(cs, ax=ax, label="predicted loss")
    ax.scatter(n_params, n_tokens, color="w", edgecolor="k", s=20, label="runs")
    cs_ = np.geomspace(6 * ns.min() * ds.min(), 6 * ns.max() * ds.max(), 50)
    n_opt, d_opt = fit.compute_optimal(cs_)
    ax.plot(n_opt, d_opt, color="r", label="compute-optimal")
    for c in flops_lines:
        ax.plot(ns, c / (6 * ns), ":", color="w", lw=1)
    ax.set(xscale="log", yscale="log", xlim=(ns[0], ns[-1]), ylim=(ds[0], ds[-1]),
           xlabel="parameters N", ylabel="tokens D", title="L(N, D) = E + A/N^a + B/D^b")
    ax.legend(fontsize=8, loc="lower right")
    return _finish(fig)


def envelope_curves(runs, n_params, n_tokens, losses, fit: EnvelopeFit):
    """Approach 1: every training curve against C = 6ND (coloured by N), the envelope's winners and
    the L(C) law through them; and N_opt(C) of the winners with its power law."""
    runs, n, d, loss = np.asarray(runs), *(np.asarray(v, np.float64) for v in (n_params, n_tokens, losses))
    fig, (ax, ax_n) = _subplots(2, figsize=(11, 4.5))
    colours = _budget_colours(np.unique(n))
    for name in dict.fromkeys(runs):
        pick = runs == name
        ax.plot(6 * n[pick] * d[pick], loss[pick], color=colours[n[pick][0]], lw=1, alpha=0.8)
    ax.scatter(fit.flops, fit.loss_opt, color="r", marker="*", s=80, zorder=3, label="envelope (bin winners)")
    xs = np.geomspace(fit.flops.min(), fit.flops.max() * 3, 100)
    ax.plot(xs, fit.loss_law(xs), "--", color="k", label=f"L(C) ~ C^-{fit.loss_law.exponent:.3f}")
    ax.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="loss",
           title="Training curves (colour: N) and their envelope")
    ax.legend(fontsize=8)
    ax_n.scatter(fit.flops, fit.n_opt, color="r", marker="*", s=80, label="winners' N")
    xs = np.geomspace(fit.flops.min(), fit.flops.max(), 50)
    ax_n.plot(xs, fit.n_law(xs), color="C0", label=f"N_opt ~ C^{fit.n_law.exponent:.3f}")
    ax_n.set(xscale="log", yscale="log", xlabel="compute C (FLOPs)", ylabel="N_opt", title="Approach 1")
    ax_n.legend(fontsize=8)
    return _finish(fig)


def prediction(predictions, measured=None):
    """Each approach's N_opt and loss at the predicted budget with their intervals, and the measured ones."""
    fig, axes = _subplots(2, figsize=(10, 4))
    names = [p.approach for p in predictions]
    for ax, key, label in ((axes[0], "n_opt", "N_opt"), (axes[1], "loss", "loss")):
        values = np.array([getattr(p, key) for p in predictions])
        lo = np.array([p.intervals.get(key, (v, v))[0] for p, v in zip(predictions, values)])
        hi = np.array([p.intervals.get(key, (v, v))[1] for p, v in zip(predictions, values)])
        ax.vlines(range(len(names)), lo, hi, color="C0", lw=6, alpha=0.35, label="90% interval")  # need not hold the point
        ax.scatter(range(len(names)), values, color="C0", zorder=3, label="predicted")
        if measured is not None:
            ax.axhline(getattr(measured, key), color="C3", ls="--", label=f"measured ({measured.how})")
        ax.set_xticks(range(len(names)), names)
        ax.set(ylabel=label, yscale="log" if key == "n_opt" else "linear", xlim=(-0.5, len(names) - 0.5),
               title=f"{label} at C = {predictions[0].flops:.3g}")
        ax.legend(fontsize=8)
    return _finish(fig)


def save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
