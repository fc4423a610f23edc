"""The tpu-vm backend: one Cloud TPU VM slice per run, driven entirely through `gcloud`.

Per run: skip it if its gs:// workdir already holds a completed summary.json; otherwise reuse its
slice if one is up (a launcher interrupted and run again) or request one as a queued resource (spot
capacity if asked), wait until it is ACTIVE, install lmjax on every
worker and start `python -m lmjax.main` on all of them at once with `tpu-vm ssh --worker=all` (JAX
finds the other hosts by itself), then delete the slice. Workdirs live on gs://, so when a spot slice
is preempted the run is re-queued on a new slice and the trainer resumes from its last checkpoint.

Every gcloud call is built by `gcloud_argv`, so tests can compare exact argv lists against a fake
`gcloud` on PATH, and `--dry_run` prints the same commands (with <PLACEHOLDERS> for anything not
configured) without running them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shlex
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from lmjax.scaling.sweeps import Run, Sweep, load_config

ACTIVE = "ACTIVE"
# TPU VM software versions per generation (Cloud TPU docs), used when --runtime_version=auto.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Queued-resource / node states after which the slice is gone and the run must be queued again.
LOST = ("PREEMPTED", "SUSPENDING", "SUSPENDED", "FAILED", "TERMINATED")


@dataclasses.dataclass(frozen=True)
class TpuOptions:
    project: str = "<PROJECT>"
    zone: str = "<ZONE>"
    accelerator_type: str = "v5litepod-16"
    runtime_version: str = "auto"  # auto: RUNTIMES by the accelerator's generation
    spot: bool = True
    sweep_dir: str = "gs://<BUCKET>/sweeps"  # runs write to <sweep_dir>/<run name>
    repo_url: str = "<REPO_URL>"  # git URL of lmjax cloned on every worker
    python: str = "python3"
    poll_seconds: float = 30.0
    max_attempts: int = 5  # slices requested per run before giving up (preemptions re-queue)

    def missing(self) -> list[str]:
        """The options still holding placeholders: a real launch refuses to start with any."""
        return [f.name for f in dataclasses.fields(self) if "<" in str(getattr(self, f.name))]


def runtime_version(opts: TpuOptions, accelerator: str) -> str:
    if opts.runtime_version != "auto":
        return opts.runtime_version
    generation = accelerator.rsplit("-", 1)[0]
    if generation not in RUNTIMES:
        raise ValueError(f"no default runtime for accelerator type {accelerator!r}; pass --runtime_version")
    return RUNTIMES[generation]


def node_name(sweep: Sweep, run: Run) -> str:
    """A valid TPU name (lowercase, digits, hyphens, <= 60 chars) that is stable per run."""
    digest = hashlib.sha1(f"{sweep.name}/{run.name}".encode()).hexdigest()[:6]
    stem = re.sub(r"[^a-z0-9-]+", "-", f"lmjax-{sweep.name}-{run.name}".lower()).strip("-")
    return f"{stem[:52].rstrip('-')}-{digest}"


def workdir(opts: TpuOptions, run: Run) -> str:
    return f"{opts.sweep_dir.rstrip('/')}/{run.name}"


def install_command(opts: TpuOptions) -> str:
    """Run on every worker: fetch lmjax (or update it) and install it with the TPU extra."""
    return (f"(test -d ~/lmjax || git clone {shlex.quote(opts.repo_url)} ~/lmjax) && cd ~/lmjax && git pull --ff-only "
            f"&& {opts.python} -m pip install -q -e '.[tpu,gcs]'")


def train_command(opts: TpuOptions, sweep: Sweep, run: Run) -> str:
    flags = sweep.config_flags(run) + [f"--workdir={workdir(opts, run)}"]
    return f"cd ~/lmjax && {shlex.join([opts.python, '-m', 'lmjax.main', *flags])}"


def gcloud_argv(action: str, opts: TpuOptions, node: str = "", command: str = "", path: str = "",
                accelerator: str | None = None) -> list[str]:
    """The argv of one gcloud call. action: create | state | ssh | delete | cat."""
    where = [f"--project={opts.project}", f"--zone={opts.zone}"]
    qr = ["gcloud", "compute", "tpus", "queued-resources"]
    if action == "create":
        accelerator = accelerator or opts.accelerator_type
        return qr + ["create", node, f"--node-id={node}", *where, f"--accelerator-type={accelerator}",
                     f"--runtime-version={runtime_version(opts, accelerator)}"] + (["--spot"] if opts.spot else [])
    if action == "state":
        return qr + ["describe", node, *where, "--format=value(state.state)"]
    if action == "ssh":
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *where, "--worker=all", f"--command={command}"]
    if action == "delete":
        return qr + ["delete", node, *where, "--force", "--quiet"]
    if action == "cat":
        return ["gcloud", "storage", "cat", path]
    raise ValueError(f"unknown gcloud action {action!r}")


def _gcloud(argv: list[str], capture: bool = False) -> subprocess.CompletedProcess:
    print("$ " + shlex.join(argv), flush=True)
    return subprocess.run(argv, capture_output=capture, text=True)


def _state(opts: TpuOptions, node: str) -> str:
    """The queued resource's state; UNKNOWN when gcloud cannot describe it (it does not exist)."""
    result = _gcloud(gcloud_argv("state", opts, node), capture=True)
    return result.stdout.strip().upper() if result.returncode == 0 else "UNKNOWN"


def _finished(opts: TpuOptions, run: Run) -> bool:
    result = _gcloud(gcloud_argv("cat", opts, path=f"{workdir(opts, run)}/summary.json"), capture=True)
    if result.returncode != 0:
        return False
    try:
        return bool(json.loads(result.stdout).get("completed"))
    except (json.JSONDecodeError, AttributeError):
        return False


def _wait_active(opts: TpuOptions, node: str) -> str:
    """Poll until ACTIVE or lost; returns the final state."""
    while True:
        state = _state(opts, node)
        if state == ACTIVE or state in LOST:
            return state
        time.sleep(opts.poll_seconds)


def run_one(sweep: Sweep, run: Run, opts: TpuOptions) -> bool:
    """Drive one run to completion on as many slices as preemptions require; True on success."""
    if _finished(opts, run):
        print(f"{run.name}: finished already, skipped", flush=True)
        return True
    node = node_name(sweep, run)
    state = _state(opts, node)  # a slice left by an interrupted launcher is reused
    try:
        for attempt in range(1, opts.max_attempts + 1):
            if state in LOST:
                _gcloud(gcloud_argv("delete", opts, node))
            if state == "UNKNOWN" or state in LOST:
                print(f"{run.name}: requesting {run.accelerator or opts.accelerator_type} as {node} "
                      f"(attempt {attempt})", flush=True)
                if _gcloud(gcloud_argv("create", opts, node, accelerator=run.accelerator)).returncode != 0:
                    print(f"{run.name}: queued-resources create failed", flush=True)
                    return False
            else:
                print(f"{run.name}: reusing {node} (state {state})", flush=True)
            state = _wait_active(opts, node)
            if state == ACTIVE:
                ok = (_gcloud(gcloud_argv("ssh", opts, node, install_command(opts))).returncode == 0
                      and _gcloud(gcloud_argv("ssh", opts, node, train_command(opts, sweep, run))).returncode == 0)
                if ok:
                    return True
                state = _state(opts, node)
                if state not in LOST:
                    print(f"{run.name}: failed on a healthy slice (state {state}); not retrying", flush=True)
                    return False
            print(f"{run.name}: slice {state}; re-queueing (training resumes from its checkpoint)", flush=True)
        print(f"{run.name}: gave up after {opts.max_attempts} slices", flush=True)
        return False
    finally:
        _gcloud(gcloud_argv("delete", opts, node))


def preflight(sweep: Sweep, run: Run, opts: TpuOptions) -> str | None:
    """None if the run's config compiles and fits on the slice, else the reason (lmjax.aot).

    Raises ValueError when the check itself cannot run (no libtpu: the [tpu] extra is missing).
    """
    accelerator = run.accelerator or opts.accelerator_type
    try:
        from lmjax.aot import check_fits  # needs the [tpu] extra; imported only when asked for

        config = load_config(sweep.base_config, {**sweep.overrides, **run.overrides})
        report = check_fits(config, accelerator, num_slices=1)
    except (ImportError, RuntimeError) as e:
        raise ValueError(f"--preflight could not compile {run.name} for {accelerator}: {e}") from None
    return None if report.fits else report.message


def print_dry_run(sweep: Sweep, opts: TpuOptions) -> None:
    for run in sweep.runs:
        node = node_name(sweep, run)
        print(f"# {run.name}")
        for argv in (gcloud_argv("cat", opts, path=f"{workdir(opts, run)}/summary.json"),
                     gcloud_argv("state", opts, node), gcloud_argv("create", opts, node, accelerator=run.accelerator),
                     gcloud_argv("state", opts, node),
                     gcloud_argv("ssh", opts, node, install_command(opts)),
                     gcloud_argv("ssh", opts, node, train_command(opts, sweep, run)),
                     gcloud_argv("delete", opts, node)):
            print(shlex.join(argv))


def run_sweep(sweep: Sweep, opts: TpuOptions, parallel: int = 1, dry_run: bool = False,
              check: bool = False) -> list[str]:
    """Every run on its own slice, `parallel` slices at a time; returns the names of failed runs."""
    if dry_run:
        print_dry_run(sweep, opts)
        return []
    if opts.missing():
        raise ValueError("the tpu-vm backend needs " + ", ".join(f"--{m}" for m in opts.missing())
                         + " (only --dry_run works with placeholders)")
    runs, failed = [], []
    for run in sweep.runs:
        reason = preflight(sweep, run, opts) if check else None
        if reason:
            print(f"{run.name}: refused by --preflight: {reason}", flush=True)
            failed.append(run.name)
        else:
            runs.append(run)
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        results = list(pool.map(lambda r: run_one(sweep, r, opts), runs))
    return failed + [r.name for r, ok in zip(runs, results) if not ok]
