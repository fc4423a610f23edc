"""Emergence, real or a mirage? BIG-bench arithmetic accuracy vs training compute beside the
continuous metrics of the same models (Schaeffer et al. 2023).

    python -m launch.sweep --sweep=configs/sweeps/emergence.py --backend=local
    python -m benchmarks.emergence --sweep_dir=runs/emergence [--limit=100] [--shots=0]
        [--tasks=../shared/data/bigbench/arithmetic] [--subtasks=2_digit_addition,...]
        [--out=benchmarks/results/emergence] [--no-evaluate] [--no-unseen_only]

Every finished run of the sweep is scored with `lmjax.evals.harness` on the chosen subtasks (the
results go to each run's `evals/<step>.json`, so a second call with the same tasks reuses them; use
--no-evaluate to only redraw), then one figure puts exact match (and multiple-choice grade) against
training compute (6 N D, N counting every parameter) beside target log-probability per token and
the token edit distance of the greedy answer.

The problem spaces are small (2-digit addition has 8,100 questions), so a synthetic corpus holds
many of BIG-bench's questions by chance. When a run trained on an `arithmetic:` source, each
subtask is cut to the examples whose question never occurs in its training split (task
`<name>.unseen`; the sweep's `holdout` keeps about half of every space out of training), unless
--no-unseen_only; the table counts evaluated questions seen in training either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure

from launch import collect
from lmjax import fileio
from lmjax.data import arithmetic
from lmjax.evals import harness
from lmjax.evals.tasks import Task, load_tasks

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


def tasks_for_run(tasks: list[Task], seen: set[str] | None, unseen_only: bool) -> list[Task]:
    """The tasks as evaluated on one run: cut to the questions it never saw, when asked and known."""
    if not unseen_only or seen is None:
        return tasks
    out = []
    for task in tasks:
        examples = tuple(ex for ex in task.examples if ex.input not in seen)
        if not examples:
            raise ValueError(f"task {task.name}: every question occurs in the training corpus (use --no-unseen_only)")
        out.append(dataclasses.replace(task, name=f"{task.name}.unseen", examples=examples))
    return out


class Corpora:
    """Training questions per data config: runs of one sweep share a corpus, generated once."""

    def __init__(self):
        self._seen: dict[str, set[str] | None] = {}

    def seen(self, workdir: str) -> set[str] | None:
        summary = json.loads(fileio.read_text(os.path.join(workdir, "summary.json")) or "{}")
        key = json.dumps(summary.get("config", {}).get("data", {}), sort_keys=True)
        if key not in self._seen:
            self._seen[key] = training_questions(workdir)
        return self._seen[key]


def evaluate_runs(sweep_dir: str, tasks: list[Task], shots: list[int], limit: int | None, unseen_only: bool,
                  corpora: Corpora) -> None:
    """Score each finished run's newest checkpoint, unless its evals file already has every task and k."""
    for row in finished_runs(sweep_dir):
        workdir, step = os.path.join(sweep_dir, row["name"]), int(row["steps"])
        mine = tasks_for_run(tasks, corpora.seen(workdir), unseen_only)
        saved = read_evals(workdir, step)
        if all(_covers(saved.get(t.name, {}).get(str(k)), t, limit) for t in mine for k in shots):
            print(f"{row['name']}: evaluated already", flush=True)
            continue
        start = time.time()
        scorer = harness.open_scorer(workdir)
        harness.write_results(workdir, step, harness.evaluate(scorer, mine, shots, limit=limit), seed=0)
        print(f"{row['name']}: evaluated in {time.time() - start:.0f}s", flush=True)


def _covers(metrics: dict | None, task: Task, limit: int | None) -> bool:
    """Saved results are reused only if they cover as many examples as asked for."""
    wanted = len(task.examples) if limit is None else min(limit, len(task.examples))
    return metrics is not None and metrics.get("examples", 0) >= wanted


def gather(sweep_dir: str, tasks: list[Task], shots: int, unseen_only: bool = True,
           corpora: Corpora | None = None) -> list[Point]:
    """A point per (finished run, task) with results at `shots` shots."""
    corpora = corpora or Corpora()
    points = []
    for row in finished_runs(sweep_dir):
        workdir = os.path.join(sweep_dir, row["name"])
        results = read_evals(workdir, int(row["steps"]))
        seen = corpora.seen(workdir)
        for task in tasks_for_run(tasks, seen, unseen_only):
            metrics = results.get(task.name, {}).get(str(shots))
            if metrics is None:
                continue
            evaluated = [ex.input for ex in task.examples[: int(metrics["examples"])]]
            points.append(Point(row["name"], task.name, int(row["n_params"]), int(row["tokens"]), float(row["flops"]),
                                metrics, None if seen is None else sum(q in seen for q in evaluated)))
    if not points:
        raise ValueError(f"no run in {sweep_dir} has {shots}-shot results for {', '.join(t.name for t in tasks)}: "
                         f"evaluate first")
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
        computes = sorted({p.flops for p in points})
        ax.set_xticks(computes, [f"{c:.1e}" for c in computes], rotation=45, fontsize=7)  # one tick per run
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
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
    p.add_argument("--unseen_only", action=argparse.BooleanOptionalAction, default=True,
                   help="evaluate only questions absent from an arithmetic: training corpus")
    p.add_argument("--notes", default="", help="text appended to the README")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    limit = args.limit or None
    try:
        paths = [os.path.join(args.tasks, s) for s in args.subtasks.split(",") if s]
        missing = [q for q in paths if not os.path.isdir(q)]
        if missing:
            raise ValueError(f"no BIG-bench subtask at {missing[0]} (--tasks is the arithmetic directory)")
        tasks = [t for q in paths for t in load_tasks(q)]
        corpora = Corpora()
        if args.evaluate:
            evaluate_runs(args.sweep_dir, tasks, [args.shots], limit, args.unseen_only, corpora)
        points = gather(args.sweep_dir, tasks, args.shots, args.unseen_only, corpora)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    shown = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("--notes")]
    command = "python -m benchmarks.emergence " + " ".join(shown)
    png, md = write(points, args.out, args.shots, command.strip(), args.notes)
    print(table(points))
    print(f"wrote {png} and {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
