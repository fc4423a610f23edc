"""The quickstart notebook runs top to bottom (a few steps of a tiny byte-level model), so it cannot rot."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_trains_plots_and_samples(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(open(os.path.join(REPO, "lmjax", "config.py")).read() * 3)
    for name, value in {
        "LMJAX_NOTEBOOK_STEPS": "8",
        "LMJAX_NOTEBOOK_SOURCE": f"text:{corpus}",
        "LMJAX_NOTEBOOK_TOKENIZER": "byte",
        "LMJAX_NOTEBOOK_EMBED_DIM": "32",
        "LMJAX_NOTEBOOK_LAYERS": "1",
        "LMJAX_NOTEBOOK_WORKDIR": str(tmp_path / "run"),
        "LMJAX_CPU_PEAK_FLOPS": "1e11",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": REPO,
    }.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=180, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()

    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert any("image/png" in o.get("data", {}) for o in outputs), "no loss plot"
    assert "final val loss" in text and "class Parser:" in text
    assert (tmp_path / "run" / "metrics.jsonl").exists()
