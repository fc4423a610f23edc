"""Resuming: kill -9, SIGTERM and a corrupt checkpoint all lead back to the uninterrupted run.

The runs evaluate and sample at every step, which makes a step slow enough (tens of milliseconds)
for a test to signal the process in the middle of a run, and checks that evaluation and sampling
leave the training state alone.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from test_main import REPO, STEPS, main_env, read_losses, run_main, write_tiny_preset


def start_main(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "lmjax.main", *args], cwd=REPO, env=main_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def read_until(process: subprocess.Popen, condition) -> list[str]:
    """Output lines up to the first one after which `condition()` holds (or the end)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if condition(line):
            break
    return lines


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: (directory, preset, workdir)."""
    directory = str(tmp_path_factory.mktemp("resume"))
    preset = write_tiny_preset(directory)
    workdir = os.path.join(directory, "reference")
    result = run_main(f"--config={preset}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return directory, preset, workdir


def all_records(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def same_numbers(a: list[dict], b: list[dict]) -> None:
    """Losses, gradient norms, learning rates and validation losses equal bit for bit."""
    keys = ("step", "loss", "grad_norm", "lr", "val_loss")
    assert [[r.get(k) for k in keys] for r in a] == [[r.get(k) for k in keys] for r in b]


@pytest.mark.slow
def test_run_killed_after_first_checkpoint_resumes_bit_exact(reference):
    directory, preset, reference_dir = reference
    workdir = os.path.join(directory, "killed")
    first_checkpoint = os.path.join(workdir, "checkpoints", "4")
    process = start_main(f"--config={preset}", f"--workdir={workdir}")
    read_until(process, lambda line: os.path.isdir(first_checkpoint))
    process.kill()
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(workdir, "summary.json")), "the run ended before the kill"
    killed_at = max(r["step"] for r in all_records(workdir))
    assert killed_at < STEPS

    # A save cut short by the kill leaves a temporary directory (if this kill did not land in one,
    # fake one): it must be ignored and removed.
    checkpoints = os.path.join(workdir, "checkpoints")
    last = max(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    if not [name for name in os.listdir(checkpoints) if "tmp" in name]:
        partial = os.path.join(checkpoints, f"{last + 4}.orbax-checkpoint-tmp")
        shutil.copytree(os.path.join(checkpoints, str(last)), partial)
        os.remove(os.path.join(partial, "commit_success.txt"))

    result = run_main(f"--config={preset}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from checkpoint step {last}" in result.stdout
    assert not [name for name in os.listdir(checkpoints) if "tmp" in name]
    same_numbers(all_records(workdir), all_records(reference_dir))
    assert read_losses(workdir) == read_losses(reference_dir)


@pytest.mark.slow
def test_sigterm_saves_the_current_step_and_exits_cleanly(reference):
    directory, preset, _ = reference
    workdir = os.path.join(directory, "sigterm")
    process = start_main(f"--config={preset}", f"--workdir={workdir}")
    lines = read_until(process, lambda line: line.startswith("step"))
    process.send_signal(signal.SIGTERM)
    lines += process.stdout.readlines()
    process.wait(timeout=60)
    output = "".join(lines)
    assert process.returncode == 0, output[-3000:]
    saved = [line for line in lines if line.startswith("SIGTERM: saved a checkpoint at step")]
    assert saved, output[-3000:]
    step = int(saved[0].split("step")[1].split(";")[0])
    assert 0 < step < STEPS
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
    assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["steps"] == step and summary["completed"] is False


@pytest.mark.slow
def test_corrupt_newest_checkpoint_resumes_from_the_previous_one(reference):
    directory, preset, reference_dir = reference
    workdir = os.path.join(directory, "corrupt")
    shutil.copytree(reference_dir, workdir)
    os.remove(os.path.join(workdir, "summary.json"))
    newest = os.path.join(workdir, "checkpoints", str(STEPS))
    for root, _, files in os.walk(os.path.join(newest, "state")):
        for name in files:
            if os.path.basename(root) == "d":
                with open(os.path.join(root, name), "wb") as f:
                    f.write(b"garbage")

    result = run_main(f"--config={preset}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"skipped corrupt checkpoint step {STEPS}" in result.stdout
    assert f"resumed from checkpoint step {STEPS - 4}" in result.stdout
    assert os.listdir(os.path.join(workdir, "corrupt_checkpoints"))[0].startswith(f"{STEPS}-")
    assert os.path.isdir(newest)
    same_numbers(all_records(workdir), all_records(reference_dir))
