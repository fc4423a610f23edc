"""Every command line fails the same way on bad input: one `error:` line naming the problem, a non-zero
exit, no traceback, nothing written."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    env.pop("LMJAX_TRACEBACK", None)
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["-m", "lmjax.data.prepare", "--config=configs/gpt_small.py", "--out={tmp}/prepared",
          "--config.data.source=text:{tmp}/nothing/*.txt"], "matched no files"),
        (["-m", "lmjax.data.prepare", "--config=configs/gpt_small.py", "--out={tmp}/prepared",
          "--config.data.nope=1"], "unknown config key config.data.nope"),
        (["-m", "lmjax.main", "--config={tmp}/missing.py", "--workdir={tmp}/run"], "missing.py"),
        (["-m", "lmjax.main", "--config=configs/gpt_small.py", "--workdir={tmp}/run",
          "--config.data.source=text:{tmp}/nothing/*.txt"], "matched no files"),
        (["-m", "lmjax.main", "--config=configs/gpt_small.py", "--workdir={tmp}/run", "--mode=eval",
          "--config.eval.steps=0"], "config.eval.steps=0 disables validation"),
        (["-m", "lmjax.aot", "--config=configs/gpt_small.py", "--topology=v5e-12"], "Unknown TPU slice 'v5e-12'"),
        (["-m", "launch.sweep", "--sweep={tmp}/missing_sweep.py"], "missing_sweep.py does not exist"),
        (["-m", "launch.collect", "--sweep_dir={tmp}/no_sweep"], "is not a directory"),
        (["-m", "launch.analyze", "--sweep_dir={tmp}/no_sweep"], "is not a directory"),
        (["benchmarks/train_step.py", "--config=configs/gpt_small.py", "--config.model.mlp=nope"],
         "config.model.mlp='nope' is not valid"),
        (["benchmarks/data_pipeline.py", "--config=configs/gpt_small.py",
          "--config.data.source=text:{tmp}/nothing/*.txt"], "matched no files"),
    ],
    ids=lambda x: x if isinstance(x, str) else " ".join(a for a in x if not a.startswith("--config=")),
)
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, argv, expected):
    result = run(*[a.format(tmp=tmp_path) for a in argv])
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == []
