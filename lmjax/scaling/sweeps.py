"""Sweeps as data: a base preset plus a list of named runs, each a set of `--config.k=v` overrides.

A sweep file (`configs/sweeps/X.py`) defines `get_sweep() -> Sweep`, usually by calling one of the
generators here:
- `isoflop`: for each compute budget C, model sizes N trained on D = C / (6 N) tokens (Chinchilla
  approach 2);
- `grid`: every size x every token budget (approach 3, and Kaplan's L(D));
- `kaplan`: sizes only, all on the same (large) number of tokens (Kaplan's L(N));
- `wsd`: the grid's token budgets from one warmup-stable-decay run per size, each smaller budget
  recorded at a decay point (needs the trainer to honour `optim.wsd_decay_points`).
Sizes are parameter counts (non-embedding by default, or total: `RunOptions.count`) turned into
shapes by `shapes.shape_for_params`; tokens
become `train.steps = D / (batch_size * seq_len)`, so the run's real D is a whole number of steps.
Run names are stable and readable (`isoflop_C1e14_N2.1M`): they name the workdirs, so re-running
a sweep finds its finished runs.
"""

from __future__ import annotations

import dataclasses
import os
import runpy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ml_collections import config_dict

from lmjax.scaling import shapes

@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    overrides: dict[str, Any]  # 'section.key' -> value, this run's own
    n_params: int  # the N of C = 6 N D: its shape's non-embedding (or, with count="total", all) parameters
    tokens: int  # training tokens: steps * batch_size * seq_len
    budget: float | None = None  # the C of its IsoFLOP profile, None outside isoflop sweeps
    accelerator: str | None = None  # tpu-vm: slice type for this run (e.g. v4-32); None: --accelerator_type
    count: str = "non_embedding"  # what n_params counts; `collect` reads the same count from summary.json

    @property
    def flops(self) -> float:
        return 6.0 * self.n_params * self.tokens


@dataclasses.dataclass(frozen=True)
class Sweep:
    name: str
    base_config: str  # preset file, relative to the repo root (or absolute)
    runs: list[Run]
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)  # shared by every run

    def __post_init__(self):
        names = [r.name for r in self.runs]
        twins = sorted({n for n in names if names.count(n) > 1})
        if twins:
            raise ValueError(f"sweep {self.name!r}: run names must be unique, repeated: {twins}")

    def config_flags(self, run: Run) -> list[str]:
        """`--config=...` and every override, shared ones first, as `python -m lmjax.main` takes them."""
        items = {**self.overrides, **run.overrides, "name": run.name}
        return [f"--config={self.base_config}"] + [f"--config.{k}={v}" for k, v in items.items()]

    def manifest(self) -> dict[str, Any]:
        """What `collect` needs to know about the runs (written as sweep.json in the sweep dir)."""
        return {"name": self.name, "base_config": self.base_config, "overrides": self.overrides,
                "runs": [dataclasses.asdict(r) for r in self.runs]}


def load_sweep(path: str) -> Sweep:
    """Run a sweep file and return its `get_sweep()`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"sweep file {path} does not exist")
    namespace = runpy.run_path(path)
    if "get_sweep" not in namespace:
        raise ValueError(f"sweep file {path} defines no get_sweep(); it must return an lmjax.scaling.sweeps.Sweep")
    sweep = namespace["get_sweep"]()
    if not isinstance(sweep, Sweep):
        raise TypeError(f"{path}: get_sweep() returned {type(sweep).__name__}, expected lmjax.scaling.sweeps.Sweep")
    return sweep


def format_count(n: float) -> str:
    """2_100_000 -> '2.1M', 100_000 -> '100K': two significant digits, K/M/B/T suffix."""
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1)):
        if n >= scale or scale == 1:
            return f"{float(f'{n / scale:.2g}'):g}{suffix}"


def format_flops(c: float) -> str:
    """1e14 -> '1e14', 3.5e13 -> '3.5e13'."""
    mantissa, exponent = f"{c:.2g}".split("e") if "e" in f"{c:.2g}" else (f"{c:.2g}", "0")
    return f"{mantissa}e{int(exponent)}"


@dataclasses.dataclass(frozen=True)
class RunOptions:
    """How generators turn (size, tokens) into a run; one set per sweep."""

    aspect_ratio: float = 32.0  # d_model / n_layers of every shape
    num_layers: int | None = None  # fixed depth, only the width scales (ignores aspect_ratio)
    count: str = "non_embedding"  # N counts "non_embedding" (Kaplan) or "total" (Hoffmann) parameters
    head_dim: int = 32
    warmup_fraction: float = 0.1  # optim.warmup_steps = this share of each run's steps
    min_steps: int = 10  # fewer steps than this is not a training run: refuse it


def make_run(name: str, base: config_dict.ConfigDict, n_params: float, tokens_for: Callable[[int], float],
             opts: RunOptions, budget: float | None = None) -> Run:
    """One run: the shape nearest `n_params`, trained for the whole number of steps nearest
    `tokens_for(its exact count)`."""
    model_cfg = base.model
    if opts.count == "total" and model_cfg.get("vocab_size") is None and base.data.tokenizer == "sentencepiece":
        model_cfg = config_dict.ConfigDict({**model_cfg.to_dict(), "vocab_size": base.data.vocab_size})  # as trained
    try:
        shape = shapes.shape_for_params(n_params, model_cfg, aspect_ratio=opts.aspect_ratio, head_dim=opts.head_dim,
                                        num_layers=opts.num_layers, count=opts.count)
    except ValueError as e:
        raise ValueError(f"run {name}: {e}") from None
    tokens = tokens_for(shape.params)
    per_step = int(base.train.batch_size) * int(base.data.seq_len)
    steps = round(tokens / per_step)
    if steps < opts.min_steps:
        raise ValueError(
            f"run {name}: {tokens:.3g} tokens are {tokens / per_step:.2f} steps of {per_step:,} tokens "
            f"(train.batch_size x data.seq_len); at least {opts.min_steps} are needed. Use a larger budget, "
            f"a smaller model or a smaller batch"
        )
    overrides = {**shape.overrides(), "train.steps": steps,
                 "optim.warmup_steps": max(1, round(opts.warmup_fraction * steps))}
    return Run(name, overrides, shape.params, steps * per_step, budget, count=opts.count)


def isoflop(base: config_dict.ConfigDict, budgets: Sequence[float],
            sizes: Sequence[float] | Mapping[float, Sequence[float]], opts: RunOptions = RunOptions()) -> list[Run]:
    """For each budget C, each size N on D = C / (6 N) tokens (N exact). `sizes` may differ per budget."""
    return [make_run(f"isoflop_C{format_flops(c)}_N{format_count(n)}", base, n, lambda exact, c=c: c / (6 * exact),
                     opts, budget=c)
            for c in budgets for n in (sizes[c] if isinstance(sizes, Mapping) else sizes)]


def grid(base: config_dict.ConfigDict, sizes: Sequence[float], tokens: Sequence[float],
         opts: RunOptions = RunOptions()) -> list[Run]:
    """Every size on every token budget."""
    return [make_run(f"grid_N{format_count(n)}_D{format_count(d)}", base, n, lambda _, d=d: d, opts)
            for n in sizes for d in tokens]


def kaplan(base: config_dict.ConfigDict, sizes: Sequence[float], tokens: float,
           opts: RunOptions = RunOptions()) -> list[Run]:
    """Sizes only, all on `tokens` tokens: Kaplan's L(N) when `tokens` is large enough to converge."""
    return [make_run(f"kaplan_N{format_count(n)}", base, n, lambda _: tokens, opts) for n in sizes]


def wsd(base: config_dict.ConfigDict, sizes: Sequence[float], tokens: Sequence[float],
        opts: RunOptions = RunOptions()) -> list[Run]:
    """A grid at the cost of its longest column: one WSD run per size, trained to the largest token
    budget, reporting the smaller budgets at decay points (`optim.wsd_decay_points`; the trainer
    must honour it, and `launch.collect` turns its `wsd_points` into rows)."""
    longest = max(tokens)
    per_step = int(base.train.batch_size) * int(base.data.seq_len)
    runs = []
    for n in sizes:
        run = make_run(f"wsd_N{format_count(n)}_D{format_count(longest)}", base, n, lambda _: longest, opts)
        points = tuple(sorted({round(d / per_step) for d in tokens if d < longest}))
        if points and points[0] < opts.min_steps:
            raise ValueError(f"run {run.name}: the {min(tokens):.3g}-token decay point is {points[0]} steps; "
                             f"at least {opts.min_steps} are needed")
        overrides = {**run.overrides, "optim.schedule": "wsd", "optim.wsd_decay_points": points}
        runs.append(dataclasses.replace(run, overrides=overrides))
    return runs
