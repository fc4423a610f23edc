"""`python -m launch.analyze --sweep_dir=DIR [--predict_flops=C]`: Kaplan and Chinchilla fits of a sweep.

Collects the sweep (see `launch.collect`), fits Kaplan's L(N), L(D), L(C_min) and Chinchilla's
approach 1 (the envelope of the training curves), approach 2 (when the sweep has IsoFLOP budgets)
and approach 3, prints the parameters and the three approaches side by side (exponents, N_opt,
D_opt and loss at one budget, with 90% bootstrap intervals given --bootstrap), and writes
`DIR/fits.json` and the figures in `DIR/plots/`. A fit the data cannot support (too few runs, a
budget whose loss is not convex in N) is reported and skipped. D is the tokens seen and C = 6 N D.
N is the non-embedding parameter count for Kaplan's laws, and the count the sweep chose
(non-embedding unless its runs count the total) for Chinchilla's.

`--predict_flops=C` fits on the runs whose budget (or compute) is below C only, and predicts the
compute-optimal N, D and loss at C: a test of the laws against runs made afterwards at C.
Approach 1 takes its points from the curves' training loss (`--envelope_loss=train`, smoothed over
`--envelope_smooth` logged steps) or from validation points only (`val`: evaluations in
metrics.jsonl, final losses, WSD decay points); its predicted loss is of that kind.
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
from lmjax.scaling import chinchilla, envelope, kaplan, predict


def usable(rows: list[dict]) -> list[dict]:
    """Rows with a final validation loss from a finished run (or a WSD decay point)."""
    return [r for r in rows if r["status"] in ("finished", "wsd") and r.get("final_val_loss") is not None]


def kaplan_params(rows: list[dict]) -> np.ndarray:
    """Kaplan et al.'s N: non-embedding parameters, whatever the sweep counted (the sweep's N if unknown)."""
    return np.array([r.get("non_embedding_params") or r["n_params"] for r in rows], np.float64)


def run_of(row: dict) -> str:
    """The run a row belongs to (a WSD decay point's row is named `<run>@<step>`)."""
    return row["name"].split("@")[0]


def curve_points(rows: list[dict], loss: str = "train", smooth: int = 3,
                 skip_fraction: float = 0.1) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Approach 1's points (run, N, D, loss) from the rows' curves.

    `train`: every logged training loss, as a trailing mean over `smooth` logged steps (one batch's loss
    is noisy, and a minimum over noisy points picks lucky batches), leaving out the first
    `skip_fraction` of each run (warmup). `val`: validation losses only (evaluations in the curve,
    final losses, WSD decay points).
    """
    if loss not in ("train", "val"):
        raise ValueError(f"--envelope_loss must be train or val, got {loss!r}")
    runs, n, d, values = [], [], [], []
    for row in usable(rows):
        if loss == "val" and row["status"] == "wsd" or not row.get("curve"):
            points = [(row["tokens"], row["final_val_loss"])] if loss == "val" else []
        else:
            per_step = row["tokens"] / row["steps"] if row.get("steps") else None
            curve = [p for p in row["curve"] if p.get("step") and per_step]
            if loss == "train":
                curve = [p for p in curve if "loss" in p]
                trailing = np.array([p["loss"] for p in curve], np.float64)
                means = [trailing[max(0, i - smooth + 1):i + 1].mean() for i in range(len(curve))]
                points = [(p["step"] * per_step, m) for p, m in zip(curve, means)
                          if p["step"] >= skip_fraction * row["steps"]]
            else:
                points = [(p["step"] * per_step, p["val_loss"]) for p in curve if "val_loss" in p]
                if not any(p["step"] == row["steps"] for p in curve if "val_loss" in p):
                    points.append((row["tokens"], row["final_val_loss"]))
        for tokens, value in points:
            runs.append(run_of(row))
            n.append(row["n_params"])
            d.append(tokens)
            values.append(value)
    return runs, np.array(n, np.float64), np.array(d, np.float64), np.array(values, np.float64)


def below(rows: list[dict], flops: float) -> list[dict]:
    """The rows of runs made below compute C: their IsoFLOP budget, or else their own 6 N D, is under C."""
    return [r for r in rows if (r.get("budget") or r.get("flops") or 6.0 * r["n_params"] * r["tokens"]) < flops]


def _bootstrap_approach1(points, replicates: int, **options) -> list:
    runs, n, d, loss = points
    names = sorted(set(runs))
    members = [np.flatnonzero(np.array(runs) == name) for name in names]

    def fit(picked):
        i = np.concatenate([members[k] for k in picked])
        return envelope.fit_envelope(n[i], d[i], loss[i], **options)
    return predict.bootstrap_fits(fit, len(names), replicates)


def _bootstrap_approach2(iso: list[tuple], replicates: int, window: int | None) -> list:
    """Runs resampled within each budget; a size drawn twice counts once (a parabola through 3 sizes
    interpolates them whatever their weights, and a window of sizes must not hold one size twice)."""
    budgets = [c for c, _, _ in iso]

    def fit(picked):
        distinct = sorted({iso[k] for k in picked})
        return chinchilla.fit_isoflop(*zip(*distinct), strict=False, window=window)
    return predict.bootstrap_fits(fit, len(iso), replicates, strata=budgets)


def fit_all(rows: list[dict], bootstrap: int = 0, isoflop_window: int | None = None, envelope_loss: str = "train",
            envelope_smooth: int = 3, envelope_bins: int = 30) -> dict:
    """Every fit the rows support: {'kaplan': {...}, 'approach1': EnvelopeFit, 'approach2': IsoFlopFit,
    'approach3': ParametricFit, 'replicates': {approach: [bootstrap refits]}, 'errors': {...}}.

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
    replicates = fits["replicates"] = {}
    points = curve_points(rows, envelope_loss, envelope_smooth)
    options = {"num_bins": envelope_bins}
    try:
        fits["approach1"] = envelope.fit_envelope(*points[1:], **options)
        replicates["approach 1"] = _bootstrap_approach1(points, bootstrap, **options) if bootstrap else []
    except ValueError as e:
        errors["approach 1"] = str(e)
    iso = [(r["budget"], r["n_params"], r["final_val_loss"]) for r in rows if r.get("budget")]
    try:
        if not iso:
            raise ValueError("no run belongs to an IsoFLOP budget")
        fits["approach2"] = chinchilla.fit_isoflop(*zip(*iso), strict=False, window=isoflop_window)
        replicates["approach 2"] = _bootstrap_approach2(iso, bootstrap, isoflop_window) if bootstrap else []
    except ValueError as e:
        errors["approach 2"] = str(e)
    try:
        fits["approach3"] = chinchilla.fit_parametric(n, d, loss, bootstrap=bootstrap)
        replicates["approach 3"] = predict.parametric_replicates(fits["approach3"])
    except ValueError as e:
        errors["approach 3"] = str(e)
    fits["errors"] = errors
    return fits


def predictions(fits: dict, flops: float) -> list[predict.Prediction]:
    """Each fitted approach's compute-optimal N, D and loss at C, with bootstrap intervals."""
    return [predict.predict(name, fits[key], flops, fits["replicates"].get(name, ()))
            for key, name in (("approach1", "approach 1"), ("approach2", "approach 2"), ("approach3", "approach 3"))
            if key in fits]


def report(fits: dict, budgets: list[float]) -> str:
    lines = [f"Kaplan {k}: {law}  (exponent {law.exponent:.4f}{'' if k == 'L(D)' else '; N non-embedding'})"
             for k, law in fits["kaplan"].items()]
    if "approach1" in fits:
        f1 = fits["approach1"]
        lines.append(f"Chinchilla approach 1: N_opt ~ C^{f1.n_law.exponent:.3f}, D_opt ~ C^{f1.d_law.exponent:.3f}, "
                     f"frontier {f1.loss_law}  ({len(f1.flops)} compute bins with a winner, {f1.num_points} curve points)")
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


def write_plots(fits: dict, rows: list[dict], out_dir: str, points=None, side_by_side=(), measured=None) -> list[str]:
    """The figures; `points` (approach 1's curve points) adds the envelope, `side_by_side` the
    predictions at one budget (with the `measured` optimum there, if any)."""
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
    if "approach1" in fits and points is not None:
        paths.append(plots.save(plots.envelope_curves(*points, fits["approach1"]), os.path.join(out_dir, "envelope.png")))
    if side_by_side:
        paths.append(plots.save(plots.prediction(side_by_side, measured), os.path.join(out_dir, "prediction.png")))
    return paths


def to_json(fits: dict) -> dict:
    fits = {k: v for k, v in fits.items() if k != "replicates"}  # the refits: their intervals are reported

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
    p.add_argument("--bootstrap", type=int, default=0, help="bootstrap replicates for the 90%% intervals of every approach")
    p.add_argument("--predict_flops", type=float, default=0.0,
                   help="fit on the runs below this compute only and predict its compute-optimal N, D and loss")
    p.add_argument("--envelope_loss", default="train", choices=("train", "val"),
                   help="approach 1: the curves' training loss, or validation points only")
    p.add_argument("--envelope_smooth", type=int, default=3, help="approach 1: trailing mean over this many logged steps")
    p.add_argument("--envelope_bins", type=int, default=30, help="approach 1: log-spaced compute bins")
    p.add_argument("--isoflop_window", type=int, default=0,
                   help="approach 2: fit each parabola to this many sizes around the lowest loss (0: all)")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True, help="write the figures")
    p.add_argument("--out_dir", default=None,
                   help="results table, fits.json and plots/ (default: the sweep dir; for gs:// a local folder named after it)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if not epath.Path(args.sweep_dir).is_dir():
        print(f"error: --sweep_dir={args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    out_dir = args.out_dir or (os.path.basename(args.sweep_dir.rstrip("/")) if fileio.is_remote(args.sweep_dir)
                               else args.sweep_dir)
    os.makedirs(out_dir, exist_ok=True)
    if args.predict_flops < 0 or args.envelope_smooth < 1 or args.envelope_bins < 3 or args.bootstrap < 0:
        print("error: --predict_flops and --bootstrap must not be negative, --envelope_smooth must be at least 1 "
              "and --envelope_bins at least 3", file=sys.stderr)
        return 2
    rows = collect.collect(args.sweep_dir)
    collect.write(rows, out_dir)
    left_out = [r["name"] for r in rows if r not in usable(rows)]
    if left_out:
        print(f"note: {len(left_out)} run(s) left out (no summary.json, unfinished or no val loss): {', '.join(left_out)}")
    measured = None
    if args.predict_flops:
        held_out = [r for r in usable(rows) if r not in below(rows, args.predict_flops)]
        at_target = [r for r in held_out if r.get("budget") and abs(r["budget"] / args.predict_flops - 1) < 0.01]
        if at_target:
            measured = predict.measured_optimum(args.predict_flops, [r["n_params"] for r in at_target],
                                                [r["final_val_loss"] for r in at_target])
        held_out = [r["name"] for r in held_out]
        rows = below(rows, args.predict_flops)
        print(f"predicting C={args.predict_flops:.3g} from the {len(usable(rows))} rows below it"
              + (f"; held out: {', '.join(held_out)}" if held_out else ""))
    if len(usable(rows)) < 2:
        print(f"error: {len(usable(rows))} finished runs with a val loss in {args.sweep_dir}"
              f"{' below --predict_flops' if args.predict_flops else ''}; nothing to fit", file=sys.stderr)
        return 1
    fits = fit_all(rows, args.bootstrap, args.isoflop_window or None, args.envelope_loss, args.envelope_smooth,
                   args.envelope_bins)
    budgets = sorted({r["budget"] for r in usable(rows) if r.get("budget")}) or [max(6 * r["n_params"] * r["tokens"] for r in usable(rows))]
    print(report(fits, budgets))
    target = args.predict_flops or budgets[-1]
    side_by_side = predictions(fits, target)
    if side_by_side:
        print(f"\n{'Prediction' if args.predict_flops else 'Side by side'} at C={target:.3g}"
              f"{f' (90% intervals over {args.bootstrap} bootstrap resamples of the runs)' if args.bootstrap else ''}; "
              f"loss of approach 1 ({args.envelope_loss} loss) and 2 from L(C) power laws, of approach 3 from L(N, D):")
        print(predict.table(side_by_side))
    if side_by_side and measured:
        print(f"\nMeasured at C={measured.flops:.3g}: N_opt={measured.n_opt:.3g}, val loss {measured.loss:.4f} "
              f"({measured.how}, held out of the fits above)")
        print(predict.scored(side_by_side, measured))
    with open(os.path.join(out_dir, "fits.json"), "w") as f:
        json.dump({**to_json(fits), "predictions": to_json({"p": side_by_side})["p"],
                   "measured": to_json({"m": measured})["m"]}, f, indent=1)
    points = curve_points(rows, args.envelope_loss, args.envelope_smooth)
    plots_dir = os.path.join(out_dir, "plots")
    for path in write_plots(fits, rows, plots_dir, points, side_by_side, measured) if args.plots else ():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
