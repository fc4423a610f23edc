"""WSD decay points: one run reports the loss of shorter token budgets, as separate runs would.

In-process runs of the tiny byte-level model of test_main (12 steps, decay points at 6 and 9).
"""

from __future__ import annotations

import json
import os

import jax
import pytest

from test_main import JAX_CACHE, tiny_config

from lmjax import config as config_lib
from lmjax.train import metrics, trainer, wsd

# Each `train` call jits its steps anew; the persistent cache (shared with test_main's subprocesses,
# set here at collection, before anything compiles) turns the repeats into cache hits.
jax.config.update("jax_compilation_cache_dir", JAX_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)

STEPS, POINTS = 12, (6, 9)
KEYS = ("step", "loss", "grad_norm", "lr", "val_loss")


def wsd_config(directory: str, steps: int = STEPS, points: tuple = ()):
    config = tiny_config(directory, steps=steps, eval_every=STEPS)
    config.model.num_layers = 1  # compiling dominates these runs: keep the programs small
    config.eval.num_samples = 0
    config.checkpoint.async_save = False
    config.optim.update(schedule="wsd", decay_fraction=0.25, warmup_steps=2, wsd_decay_points=points)
    return config


def numbers(workdir: str) -> list[list]:
    return [[r.get(k) for k in KEYS] for r in metrics.read_metrics(workdir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: (workdir, summary)} for the main run with and without decay points."""
    os.environ.setdefault("LMJAX_CPU_PEAK_FLOPS", "1e11")
    directory = str(tmp_path_factory.mktemp("wsd"))
    result = {}
    for name, points in (("plain", ()), ("points", POINTS)):
        workdir = os.path.join(directory, name)
        result[name] = workdir, trainer.train(wsd_config(directory, points=points), workdir)
    result["directory"] = directory
    return result


@pytest.mark.slow
def test_decay_points_are_recorded_at_their_steps_and_tokens(runs):
    workdir, summary = runs["points"]
    tokens_per_step = 4 * 32
    assert [(p["step"], p["tokens"], p["decay_start"]) for p in summary["wsd_points"]] == [
        (6, 6 * tokens_per_step, 4), (9, 9 * tokens_per_step, 7)]
    assert all(p["val_loss"] > 0 for p in summary["wsd_points"])
    assert wsd.read_records(workdir) == summary["wsd_points"]
    assert json.load(open(os.path.join(workdir, "summary.json")))["wsd_points"] == summary["wsd_points"]
    assert runs["plain"][1]["wsd_points"] == []


@pytest.mark.slow
def test_main_run_metrics_do_not_depend_on_decay_points(runs):
    assert numbers(runs["points"][0]) == numbers(runs["plain"][0])
    assert runs["points"][1]["final_val_loss"] == runs["plain"][1]["final_val_loss"]


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_branch_equals_a_separate_run_of_that_length(runs, point):
    directory = runs["directory"]
    separate = trainer.train(wsd_config(directory, steps=point), os.path.join(directory, f"separate_{point}"))
    record = {p["step"]: p for p in runs["points"][1]["wsd_points"]}[point]
    assert record["val_loss"] == pytest.approx(separate["final_val_loss"], abs=1e-6, rel=0)
    assert record["train_loss"] == pytest.approx(separate["final_train_loss"], abs=1e-6, rel=0)


@pytest.mark.slow
def test_run_stopped_mid_branch_redoes_only_that_branch_on_resume(runs, monkeypatch):
    workdir = os.path.join(runs["directory"], "interrupted")
    config = wsd_config(runs["directory"], points=POINTS)
    original, calls = wsd.DecayBranches._branch, []

    def stopped_at_second(self, point, *args):
        calls.append(point)
        if point == POINTS[1] and calls.count(point) == 1:
            raise KeyboardInterrupt("stopped mid-branch")
        return original(self, point, *args)

    monkeypatch.setattr(wsd.DecayBranches, "_branch", stopped_at_second)
    with pytest.raises(KeyboardInterrupt):
        trainer.train(config, workdir)
    assert [r["step"] for r in wsd.read_records(workdir)] == [POINTS[0]]
    summary = trainer.train(config, workdir)  # resumes from the checkpoint at step 4
    assert calls == [POINTS[0], POINTS[1], POINTS[1]]
    assert summary["wsd_points"] == runs["points"][1]["wsd_points"]
    assert numbers(workdir) == numbers(runs["plain"][0])


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(schedule="cosine"), ["wsd_decay_points=(6, 9)", "schedule='wsd'", "'cosine'"]),
        (dict(wsd_decay_points=(6, 12)), ["wsd_decay_points=(6, 12)", "12 must be < config.train.steps=12"]),
        (dict(wsd_decay_points=(2,)), ["wsd_decay_points=(2,)", "2 is too small", "warmup_steps=2"]),
        (dict(wsd_decay_points=(6.5,)), ["6.5", "not a whole number"]),
    ],
)
def test_bad_decay_points_fail_clearly(tmp_path, changes, expected):
    config = wsd_config(str(tmp_path), points=POINTS)
    config.optim.update(**changes)
    with pytest.raises(ValueError) as error:
        config_lib.check(config)
    for piece in expected:
        assert piece in str(error.value), (piece, str(error.value))
