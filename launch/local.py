"""The local backend: each run is a `python -m lmjax.main` subprocess with its own workdir.

Re-invoking the same sweep is safe: runs whose summary.json says completed are skipped, and the
others are started again with the same command, which makes the trainer resume from its latest
checkpoint. Each run's console output goes to `<workdir>/train.log`.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass

from lmjax.train import metrics
from lmjax.config import REPO_ROOT
from lmjax.scaling.sweeps import Run, Sweep

LOG = "train.log"


def command(sweep: Sweep, run: Run, sweep_dir: str, main: str = "lmjax.main") -> list[str]:
    """The argv of one run (`main` is the module to run: tests swap in a stand-in trainer)."""
    return [sys.executable, "-m", main, *sweep.config_flags(run), f"--workdir={os.path.join(sweep_dir, run.name)}"]


@dataclass
class _Job:
    index: int
    run: Run
    process: subprocess.Popen
    started: float
    log: object


def _describe(summary: dict | None) -> str:
    if not summary:
        return ""
    loss = summary.get("final_val_loss")
    return f" (val_loss {loss:.4f})" if isinstance(loss, (int, float)) else ""


def run_sweep(sweep: Sweep, sweep_dir: str, parallel: int = 1, dry_run: bool = False,
              main: str = "lmjax.main") -> list[str]:
    """Run every unfinished run, `parallel` at a time; returns the names of the runs that failed."""
    sweep_dir = os.path.abspath(sweep_dir)  # the runs start in the repo root, wherever we are
    total, failed, pending, active = len(sweep.runs), [], [], []
    for i, run in enumerate(sweep.runs, 1):
        workdir = os.path.join(sweep_dir, run.name)
        if dry_run:
            print(shlex.join(command(sweep, run, sweep_dir, main)))
        elif metrics.is_complete(workdir):
            print(f"[{i}/{total}] {run.name}: finished already, skipped{_describe(metrics.read_summary(workdir))}", flush=True)
        else:
            pending.append((i, run))
    while pending or active:
        while pending and len(active) < max(1, parallel):
            i, run = pending.pop(0)
            workdir = os.path.join(sweep_dir, run.name)
            os.makedirs(workdir, exist_ok=True)
            verb = "resuming" if any(name != LOG for name in os.listdir(workdir)) else "starting"
            log = open(os.path.join(workdir, LOG), "a")
            print(f"[{i}/{total}] {run.name}: {verb} ({run.n_params:,} params, {run.tokens:,} tokens)", flush=True)
            process = subprocess.Popen(command(sweep, run, sweep_dir, main), cwd=REPO_ROOT, stdout=log,
                                       stderr=subprocess.STDOUT)
            active.append(_Job(i, run, process, time.time(), log))
        time.sleep(0.2)
        for job in [j for j in active if j.process.poll() is not None]:
            active.remove(job)
            job.log.close()
            workdir = os.path.join(sweep_dir, job.run.name)
            took = time.time() - job.started
            if job.process.returncode == 0 and metrics.is_complete(workdir):
                print(f"[{job.index}/{total}] {job.run.name}: done in {took:.0f}s"
                      f"{_describe(metrics.read_summary(workdir))}", flush=True)
            else:
                why = f"exit {job.process.returncode}" if job.process.returncode else "exited before completing"
                print(f"[{job.index}/{total}] {job.run.name}: FAILED ({why}) after {took:.0f}s; "
                      f"see {os.path.join(workdir, LOG)}", flush=True)
                failed.append(job.run.name)
    return failed
