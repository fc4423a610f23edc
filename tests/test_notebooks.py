"""The notebooks run top to bottom at tiny size (the quickstart trains, plots and samples; the inference one
plots loss against layers used and against sparsity), so they cannot rot, and their install cells do the
right thing where lmjax is not installed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


def execute(path: str, monkeypatch, env: dict[str, str]) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a kernel whose environment has `env` (its tiny-size overrides)."""
    for name, value in {"JAX_PLATFORMS": "cpu", "PYTHONPATH": REPO, **env}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    return notebook


def tiny_training(tmp_path, **overrides: str) -> dict[str, str]:
    """The LMJAX_NOTEBOOK_* overrides of a few steps of a tiny byte-level model on lmjax's own source."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(REPO, "lmjax", "config.py")).read() * 3)
    env = {"LMJAX_NOTEBOOK_SOURCE": f"text:{corpus}", "LMJAX_NOTEBOOK_TOKENIZER": "byte",
           "LMJAX_NOTEBOOK_EMBED_DIM": "32", "LMJAX_NOTEBOOK_WORKDIR": str(tmp_path / "run"),
           "LMJAX_CPU_PEAK_FLOPS": "1e11"}
    return {**env, **{f"LMJAX_NOTEBOOK_{k.upper()}": v for k, v in overrides.items()}}


def printed(notebook: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for o in cell.get("outputs", []) if o.get("output_type") == "stream")


def figure_cells(notebook: nbformat.NotebookNode) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"
            and any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))]


@pytest.mark.slow
def test_quickstart_notebook_trains_plots_and_samples(tmp_path, monkeypatch):
    notebook = execute(NOTEBOOK, monkeypatch, tiny_training(tmp_path, steps="8", layers="1"))
    text = printed(notebook)
    assert figure_cells(notebook), "no loss plot"
    assert "final val loss" in text and "class Parser:" in text
    assert (tmp_path / "run" / "metrics.jsonl").exists()


INFERENCE_NOTEBOOK = os.path.join(REPO, "notebooks", "inference.ipynb")


@pytest.mark.slow
def test_inference_notebook_plots_loss_vs_layers_and_vs_sparsity(tmp_path, monkeypatch):
    notebook = execute(INFERENCE_NOTEBOOK, monkeypatch,
                       tiny_training(tmp_path, steps="4", layers="2", sparsities="0.5,0.75"))
    assert len(figure_cells(notebook)) == 2, "expected the loss-vs-layers and loss-vs-sparsity figures"
    text = printed(notebook)
    # The full model's loss read through the exit head path and through the eval step agree.
    full = float(re.search(r"full model \(2 layers\) val loss: ([0-9.]+)", text).group(1))
    dense = float(re.search(r"dense val loss: ([0-9.]+)", text).group(1))
    assert abs(full - dense) < 2e-3, (full, dense)
    assert "exit after 1 layer(s)" in text and "threshold 0.1:" in text
    for method in ("magnitude 0.75", "wanda 0.5", "2:4 0.5"):
        assert f"{method}: " in text, method


EVALS_NOTEBOOK = os.path.join(REPO, "notebooks", "evals.ipynb")
POSTTRAIN_NOTEBOOK = os.path.join(REPO, "notebooks", "posttrain.ipynb")
NOTEBOOKS = [NOTEBOOK, os.path.join(REPO, "notebooks", "scaling_laws.ipynb"), INFERENCE_NOTEBOOK, EVALS_NOTEBOOK,
             POSTTRAIN_NOTEBOOK]


def install_cell(path: str) -> str:
    notebook = nbformat.read(path, as_version=4)
    return next(cell.source for cell in notebook.cells if cell.cell_type == "code")


def run_without_lmjax(code: str, cwd, **env) -> subprocess.CompletedProcess:
    """`code` in a Python that cannot import lmjax (no site-packages: -S), as on a fresh Colab."""
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LMJAX_SOURCE")}
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env={**environ, **env},
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_cell_outside_a_clone_stops_saying_what_to_set(tmp_path, path):
    (tmp_path / "content").mkdir()  # Colab's working folder: no clone in it or above it
    result = run_without_lmjax(install_cell(path), tmp_path / "content")
    assert result.returncode != 0
    assert "set LMJAX_SOURCE in this cell" in result.stderr, result.stderr[-2000:]
    assert "installing lmjax" not in result.stdout  # nothing was attempted


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_install_cell_installs_from_the_source_it_is_given(tmp_path, path):
    source = str(tmp_path / "no-such-clone")
    result = run_without_lmjax(install_cell(path), tmp_path, LMJAX_SOURCE=source)
    assert f"installing lmjax from {source}" in result.stdout
    assert result.returncode != 0 and "pip" in result.stderr  # pip ran, and failed on the missing source


@pytest.mark.slow
def test_evals_notebook_draws_its_four_figures_at_tiny_size(tmp_path, monkeypatch):
    notebook = execute(EVALS_NOTEBOOK, monkeypatch, {"LMJAX_NOTEBOOK_TINY": "1", "LMJAX_NOTEBOOK_WORKDIR": str(tmp_path)})
    figures = figure_cells(notebook)
    assert len(figures) == 4, [cell.source[:60] for cell in figures]
    text = "".join(o.get("text", "") for cell in figures for o in cell.outputs if o.get("output_type") == "stream")
    assert "induction score" in text and "exact" in text and "free-running" in text
    assert "k= 2: accuracy" in text and "(ceiling " in text  # the k-shot curve, every k evaluated
    # every checkpoint of the two checkpointed runs was measured, and every answer digit of the third
    assert text.count("step ") >= 2 and "t= 9:" in text
    assert (tmp_path / "arithmetic" / "evals" / "8.json").exists()


@pytest.mark.slow
def test_posttrain_notebook_runs_every_stage_and_draws_its_curves_at_tiny_size(tmp_path, monkeypatch):
    notebook = execute(POSTTRAIN_NOTEBOOK, monkeypatch, {"LMJAX_NOTEBOOK_TINY": "1", "LMJAX_NOTEBOOK_WORKDIR": str(tmp_path)})
    assert len(figure_cells(notebook)) == 1, "expected the one figure of curves"
    text = printed(notebook)
    # Step 0 is the SFT policy measured against itself: its KL to the reference is exactly 0.
    assert re.search(r"PPO kl_coef 0.05 step   0: judge [0-9.]+ \(greedy [0-9.]+\), KL k1 0\.000 k3 0\.000",
                     text), text[-3000:]
    assert "PPO kl_coef 0.05 step   2: judge" in text  # every PPO checkpoint was measured
    assert "SFT + PPO (kl_coef 0.05)" in text and "SFT + DPO" in text and "pretrained" in text
    runs = tmp_path / "runs"
    for stage in ("pretrain", "sft", "reward", "ppo", "dpo"):
        assert (runs / stage / "metrics.jsonl").exists(), stage
    from lmjax.posttrain import stdlib

    pairs = [json.loads(line) for line in (runs / "data" / "pairs_train.jsonl").read_text().splitlines()]
    assert pairs and all(stdlib.parses(p["prompt"], p["chosen"]) for p in pairs)  # the judge's chosen side parses
