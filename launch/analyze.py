"""`python -m launch.analyze --sweep_dir=DIR`: Kaplan and Chinchilla fits of a collected sweep.

Collects the sweep (see `launch.collect`), fits Kaplan's L(N), L(D), L(C_min), Chinchilla approach 2
(when the sweep has IsoFLOP budgets) and approach 3, prints the parameters and the compute-optimal
tokens per parameter, and writes `DIR/fits.json` and the figures in `DIR/plots/`. A fit the data
cannot support (too few runs, a budget whose loss is not convex in N) is reported and skipped.
D is the tokens seen and C = 6 N D. N is the non-embedding parameter count for Kaplan's laws, and
the count the sweep chose (non-embedding unless its runs count the total) for Chinchilla's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import numpy as np
from etils import epath

from launch import collect
from lmjax import fileio
from lmjax.scaling import chinchilla, kaplan


def usable(rows: list[dict]) -> list[dict]:
    """Rows with a final validation loss from a finished run (or a WSD decay point)."""
    return [r for r in rows if r["status"] in ("finished", "wsd") and r.get("final_val_loss") is not None]


def kaplan_params(rows: list[dict]) -> np.ndarray:
    """Kaplan et al.'s N: non-embedding parameters, whatever the sweep counted (the sweep's N if unknown)."""
    return np.array([r.get("non_embedding_params") or r["n_params"] for r in rows], np.float64)


def fit_all(rows: list[dict], bootstrap: int = 0, isoflop_window: int | None = None) -> dict:
    """Every fit the rows support: {'kaplan': {...}, 'approach2': IsoFlopFit, 'approach3': ParametricFit, 'errors': {...}}.

    Kaplan's laws take N as non-embedding parameters (their convention); the Chinchilla approaches take
    the N the sweep counted (`n_params`), so that their C = 6 N D is the one the budgets were set in.
    """
    rows = usable(rows)
    n = np.array([r["n_params"] for r in rows], np.float64)
    n_kaplan = kaplan_params(rows)
    d = np.array([r["tokens"] for r in rows], np.float64)
    loss = np.array([r["final_val_loss"] for r in rows], np.float64)
    fits, errors = {"kaplan": {}}, {}
    for key, x, fit in (("L(N)", n_kaplan, kaplan.fit_loss_vs_params), ("L(D)", d, kaplan.fit_loss_vs_tokens),
                        ("L(C)", 6 * n_kaplan * d, kaplan.fit_loss_vs_compute)):
        try:
            fits["kaplan"][key] = fit(x, loss)
        except ValueError as e:
            errors[f"kaplan {key}"] = str(e)
    iso = [(r["budget"], r["n_params"], r["final_val_loss"]) for r in rows if r.get("budget")]
    try:
        if not iso:
            raise ValueError("no run belongs to an IsoFLOP budget")
        fits["approach2"] = chinchilla.fit_isoflop(*zip(*iso), strict=False, window=isoflop_window)
    except ValueError as e:
        errors["approach 2"] = str(e)
    try:
        fits["approach3"] = chinchilla.fit_parametric(n, d, loss, bootstrap=bootstrap)
    except ValueError as e:
        errors["approach 3"] = str(e)
    fits["errors"] = errors
    return fits


def report(fits: dict, budgets: list[float]) -> str:
    lines = [f"Kaplan {k}: {law}  (exponent {law.exponent:.4f}{'' if k == 'L(D)' else '; N non-embedding'})"
             for k, law in fits["kaplan"].items()]
    if "approach2" in fits:
        f2 = fits["approach2"]
        lines.append(f"Chinchilla approach 2: N_opt ~ C^{f2.n_law.exponent:.3f}, D_opt ~ C^{f2.d_law.exponent:.3f}")
        for c, n_opt, d_opt, l_opt in zip(f2.budgets, f2.n_opt, f2.d_opt, f2.loss_opt):
            lines.append(f"  C={c:.3g}: N_opt={n_opt:.3g}, D_opt={d_opt:.3g}, D/N={d_opt / n_opt:.1f}, loss={l_opt:.4f}")
        lines.extend(f"  left out: {why}" for why in f2.skipped.values())
    if "approach3" in fits:
        f3 = fits["approach3"]
        lines.append(f"Chinchilla approach 3: L = {f3.E:.4f} + {f3.A:.4g}/N^{f3.alpha:.4f} + {f3.B:.4g}/D^{f3.beta:.4f}"
                     f"  ({f3.num_starts} starts, {f3.fit_time_s:.1f}s)")
        if f3.intervals:
            lines.append("  90% bootstrap intervals: " + ", ".join(f"{k} [{lo:.4g}, {hi:.4g}]" for k, (lo, hi) in f3.intervals.items()))
        a = f3.beta / (f3.alpha + f3.beta)
        lines.append(f"  N_opt ~ C^{a:.3f}, D_opt ~ C^{1 - a:.3f}")
        for c in budgets:
            n_opt, d_opt = f3.compute_optimal(c)
            lines.append(f"  C={c:.3g}: N_opt={n_opt:.3g}, D_opt={d_opt:.3g}, compute-optimal tokens per parameter {d_opt / n_opt:.1f}")
    lines += [f"skipped {k}: {v}" for k, v in fits["errors"].items()]
    return "\n".join(lines)


def write_plots(fits: dict, rows: list[dict], out_dir: str) -> list[str]:
    from lmjax.scaling import plots  # matplotlib only when figures are wanted

    rows = usable(rows)
    n = np.array([r["n_params"] for r in rows], np.float64)
    d = np.array([r["tokens"] for r in rows], np.float64)
    loss = np.array([r["final_val_loss"] for r in rows], np.float64)
    paths = [plots.save(plots.loss_vs_compute(6 * kaplan_params(rows) * d, loss, fits["kaplan"].get("L(C)")),
                        os.path.join(out_dir, "loss_vs_compute.png"))]
    if "approach2" in fits:
        iso = [r for r in rows if r.get("budget")]
        paths.append(plots.save(plots.isoflop_curves([r["budget"] for r in iso], [r["n_params"] for r in iso],
                                                     [r["final_val_loss"] for r in iso], fits["approach2"]),
                                os.path.join(out_dir, "isoflop.png")))
        paths.append(plots.save(plots.optimal_allocation(fits["approach2"], fits.get("approach3")),
                                os.path.join(out_dir, "optimal_allocation.png")))
    if "approach3" in fits:
        budgets = sorted({r["budget"] for r in rows if r.get("budget")})
        paths.append(plots.save(plots.loss_contours(fits["approach3"], n, d, budgets),
                                os.path.join(out_dir, "loss_contours.png")))
    return paths


def to_json(fits: dict) -> dict:
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {k: plain(x) for k, x in dataclasses.asdict(v).items()}
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (np.ndarray, list, tuple)):
            return [plain(x) for x in v]
        return v.item() if isinstance(v, np.generic) else v
    return plain(fits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.analyze", description=__doc__.splitlines()[0])
    p.add_argument("--sweep_dir", required=True)
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates for approach 3 intervals")
    p.add_argument("--isoflop_window", type=int, default=0,
                   help="approach 2: fit each parabola to this many sizes around the lowest loss (0: all)")
    p.add_argument("--out_dir", default=None,
                   help="results table, fits.json and plots/ (default: the sweep dir; for gs:// a local folder named after it)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not epath.Path(args.sweep_dir).is_dir():
        print(f"error: --sweep_dir={args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    out_dir = args.out_dir or (os.path.basename(args.sweep_dir.rstrip("/")) if fileio.is_remote(args.sweep_dir)
                               else args.sweep_dir)
    os.makedirs(out_dir, exist_ok=True)
    rows = collect.collect(args.sweep_dir)
    collect.write(rows, out_dir)
    left_out = [r["name"] for r in rows if r not in usable(rows)]
    if left_out:
        print(f"note: {len(left_out)} run(s) left out (no summary.json, unfinished or no val loss): {', '.join(left_out)}")
    if len(usable(rows)) < 2:
        print(f"error: {len(usable(rows))} finished runs with a val loss in {args.sweep_dir}; nothing to fit", file=sys.stderr)
        return 1
    fits = fit_all(rows, args.bootstrap, args.isoflop_window or None)
    budgets = sorted({r["budget"] for r in usable(rows) if r.get("budget")}) or [max(6 * r["n_params"] * r["tokens"] for r in usable(rows))]
    print(report(fits, budgets))
    with open(os.path.join(out_dir, "fits.json"), "w") as f:
        json.dump(to_json(fits), f, indent=1)
    for path in write_plots(fits, rows, os.path.join(out_dir, "plots")):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
