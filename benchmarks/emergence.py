"""Emergence, real or a mirage? BIG-bench arithmetic accuracy vs training compute beside the
continuous metrics of the same models (Schaeffer et al. 2023).

    python -m launch.sweep --sweep=configs/sweeps/emergence.py --backend=local
    python -m benchmarks.emergence --sweep_dir=runs/emergence [--limit=100] [--shots=0]
        [--tasks=../shared/data/bigbench/arithmetic] [--subtasks=2_digit_addition,...]
        [--out=benchmarks/results/emergence] [--no_evaluate]

Every finished run of the sweep is scored with `lmjax.evals.harness` on the chosen subtasks (the
results go to each run's `evals/<step>.json`, so a second call with the same tasks reuses them; use
--no_evaluate to only redraw), then one figure puts exact match (and multiple-choice grade) against
training compute (6 N D, N counting every parameter) beside target log-probability per token and
the token edit distance of the greedy answer. When a run trained on an `arithmetic:` source, the
table also says how many of the evaluated questions occur word for word in its training corpus
(the problem spaces are small: 2-digit addition has 8,100 questions).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from launch import collect
from lmjax import fileio
from lmjax.data import arithmetic
from lmjax.evals import harness
from lmjax.evals.tasks import load_tasks

DEFAULT_SUBTASKS = ("1_digit_addition", "2_digit_addition", "3_digit_addition", "2_digit_multiplication")
ACCURACY = ("exact_str_match", "multiple_choice_grade")
CONTINUOUS = ("target_logprob_per_token", "edit_distance")


@dataclasses.dataclass(frozen=True)
class Point:
    """One run's metrics on one subtask."""

    run: str
    task: str
    n_params: int
    tokens: int
    flops: float
    metrics: dict[str, float]
    seen_in_training: int | None  # evaluated questions that occur in the run's training corpus


def finished_runs(sweep_dir: str) -> list[dict]:
    rows = [r for r in collect.collect(sweep_dir) if r["status"] == "finished" and "@" not in r["name"]]
    if not rows:
        raise ValueError(f"{sweep_dir} holds no finished run (train the sweep first: python -m launch.sweep ...)")
    return sorted(rows, key=lambda r: r["flops"])


def evaluate_runs(sweep_dir: str, task_paths: list[str], shots: list[int], limit: int | None) -> None:
    """Score each finished run's newest checkpoint, unless its evals file already has every task and k."""
    names = [t.name for p in task_paths for t in load_tasks(p)]
    for row in finished_runs(sweep_dir):
        workdir = os.path.join(sweep_dir, row["name"])
        saved = read_evals(workdir, int(row["steps"]))
        if saved and all(str(k) in saved.get(n, {}) and _limit_ok(saved[n][str(k)], limit) for n in names for k in shots):
            print(f"{row['name']}: evaluated already", flush=True)
            continue
        start = time.time()
        harness.evaluate_workdir(None, workdir, task_paths, shots, limit=limit)
        print(f"{row['name']}: evaluated in {time.time() - start:.0f}s", flush=True)


def _limit_ok(metrics: dict, limit: int | None) -> bool:
    """Saved results are reused only if they cover as many examples as asked for."""
    return limit is None or metrics.get("examples", 0) >= limit


def read_evals(workdir: str, step: int) -> dict:
    text = fileio.read_text(harness.results_path(workdir, step))
    return json.loads(text)["results"] if text else {}


def training_questions(workdir: str) -> set[str] | None:
    """The questions of the run's training split, when it trained on an `arithmetic:` source."""
    summary = json.loads(fileio.read_text(os.path.join(workdir, "summary.json")) or "{}")
    data_cfg = summary.get("config", {}).get("data", {})
    kind, _, arg = str(data_cfg.get("source", "")).partition(":")
    if kind != "arithmetic":
        return None
    return set(arithmetic.questions(arithmetic.parse(arg), "train", data_cfg.get("val_fraction", 0.0)))


def gather(sweep_dir: str, tasks: dict[str, list[str]], shots: int) -> list[Point]:
    """A point per (finished run, task) with results at `shots` shots. `tasks`: name -> the inputs
    of its evaluated examples (to count those seen in training)."""
    points = []
    corpora: dict[str, set[str] | None] = {}
    for row in finished_runs(sweep_dir):
        workdir = os.path.join(sweep_dir, row["name"])
        results = read_evals(workdir, int(row["steps"]))
        source = json.dumps(json.loads(fileio.read_text(os.path.join(workdir, "summary.json")))
                            .get("config", {}).get("data", {}), sort_keys=True)
        if source not in corpora:
            corpora[source] = training_questions(workdir)
        seen = corpora[source]
        for name, inputs in tasks.items():
            metrics = results.get(name, {}).get(str(shots))
            if metrics is None:
                continue
            evaluated = inputs[: int(metrics["examples"])]
            points.append(Point(row["name"], name, int(row["n_params"]), int(row["tokens"]), float(row["flops"]),
                                metrics, None if seen is None else sum(q in seen for q in evaluated)))
    if not points:
        raise ValueError(f"no run in {sweep_dir} has {shots}-shot results for {', '.join(tasks)}: evaluate first")
    return points


def plot(points: list[Point], shots: int) -> Figure:
    """Accuracy (left) and the continuous metrics (right) vs training compute, a line per task."""
    fig = Figure(figsize=(13, 3.8))
    axes = fig.subplots(1, 4)
    titles = {"exact_str_match": "exact match (greedy)", "multiple_choice_grade": "multiple-choice grade",
              "target_logprob_per_token": "target log-prob per token (nats)",
              "edit_distance": "edit distance of the greedy answer (tokens)"}
    colours = matplotlib.colormaps["viridis"]
    names = list(dict.fromkeys(p.task for p in points))
    for ax, metric in zip(axes, ACCURACY + CONTINUOUS):
        for i, name in enumerate(names):
            mine = sorted((p for p in points if p.task == name and metric in p.metrics), key=lambda p: p.flops)
            if mine:
                ax.plot([p.flops for p in mine], [p.metrics[metric] for p in mine], "o-",
                        color=colours(0.85 * i / max(len(names) - 1, 1)), label=name)
        ax.set_xscale("log")
        ax.set_xlabel("training compute 6ND (FLOPs)")
        ax.set_title(titles[metric], fontsize=9)
        if metric in ACCURACY:
            ax.set_ylim(-0.03, 1.03)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"BIG-bench arithmetic, {shots}-shot: discontinuous vs continuous metrics of the same models",
                 fontsize=10)
    fig.tight_layout()
    return fig


def table(points: list[Point]) -> str:
    head = ("| run | params | tokens | compute (FLOPs) | task | examples | seen in training | exact match | "
            "mc grade | log-prob/token | edit distance |")
    lines = [head, "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for p in sorted(points, key=lambda p: (p.task, p.flops)):
        m = p.metrics
        cells = [p.run, f"{p.n_params:,}", f"{p.tokens:,}", f"{p.flops:.2e}", p.task, str(int(m["examples"])),
                 "-" if p.seen_in_training is None else str(p.seen_in_training)]
        cells += [f"{m[k]:.3f}" if k in m else "-" for k in ACCURACY + CONTINUOUS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write(points: list[Point], out: str, shots: int, command: str, notes: str = "") -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    png, md = os.path.join(out, "emergence.png"), os.path.join(out, "README.md")
    plot(points, shots).savefig(png, dpi=110)
    with open(md, "w") as f:
        f.write(f"# Emergence: BIG-bench arithmetic vs training compute\n\n`{command}`\n\n"
                f"![accuracy and continuous metrics vs compute](emergence.png)\n\n{table(points)}\n"
                + (f"\n{notes}\n" if notes else ""))
    return png, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.emergence", description=__doc__.splitlines()[0])
    p.add_argument("--sweep_dir", default="runs/emergence")
    p.add_argument("--tasks", default="../shared/data/bigbench/arithmetic", help="BIG-bench arithmetic directory")
    p.add_argument("--subtasks", default=",".join(DEFAULT_SUBTASKS))
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--limit", type=int, default=100, help="examples per subtask (0: all)")
    p.add_argument("--out", default="benchmarks/results/emergence")
    p.add_argument("--evaluate", action=argparse.BooleanOptionalAction, default=True,
                   help="score runs that lack results (--no_evaluate: only redraw)")
    p.add_argument("--notes", default="", help="text appended to the README")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    limit = args.limit or None
    try:
        paths = [os.path.join(args.tasks, s) for s in args.subtasks.split(",") if s]
        missing = [q for q in paths if not os.path.isdir(q)]
        if missing:
            raise ValueError(f"no BIG-bench subtask at {missing[0]} (--tasks is the arithmetic directory)")
        tasks = {t.name: [ex.input for ex in t.examples] for q in paths for t in load_tasks(q)}
        if args.evaluate:
            evaluate_runs(args.sweep_dir, paths, [args.shots], limit)
        points = gather(args.sweep_dir, tasks, args.shots)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    command = "python -m benchmarks.emergence " + " ".join(sys.argv[1:] if argv is None else argv)
    png, md = write(points, args.out, args.shots, command.strip(), args.notes)
    print(table(points))
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
