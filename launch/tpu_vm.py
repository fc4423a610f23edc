"""The tpu-vm backend: one Cloud TPU VM slice per run, driven entirely through `gcloud`.

A run is finished only when its gs:// workdir holds a summary.json saying `"completed": true`. The
trainer's exit status cannot tell: on SIGTERM (a spot slice being reclaimed, host maintenance) it
saves a checkpoint and exits 0 with the run unfinished.

Per run: skip it if it is finished already. Otherwise reuse its slice if one is up (a launcher
killed and run again: if the trainer still runs there, only wait for it) or request one as a queued
resource (spot capacity if asked) and wait, at most --active_timeout_s, until it is ACTIVE. Install lmjax on every worker and start
`python -m lmjax.main` detached on all of them at once (`tpu-vm ssh --worker=all`; JAX finds the
other hosts by itself), so that training outlives the ssh connection. Each worker keeps the trainer's
log, pid and exit status in ~/lmjax-run/<run>.{log,pid,rc}; starting is a no-op where the trainer
is running already. Then poll, every --poll_seconds: the exit status on worker 0, the summary, and
the queued resource's state. An ssh poll that fails (a dropped connection) is simply polled again.

- summary completed: done.
- the slice is no longer ACTIVE (preempted, suspended, failed): delete it and request a new one.
- the trainer exited without completing on a healthy slice: exit 0 (a maintenance SIGTERM) starts
  it again; any other status is a crash, reported as a failure and not retried, since retrying a
  deterministic crash only repeats it.
- the slice stays queued past --active_timeout_s: the run fails (capacity is short and waiting in
  the queue again would not help); running the sweep again queues it anew.

Every restart uses the same command and workdir, so the trainer resumes from its last checkpoint.
--max_attempts bounds the slices requested and restarts made per run, and the slice is deleted when
the run ends, however it ends.

`--dry_run` prints the gcloud commands (with <PLACEHOLDERS> for anything not configured) without
running them.
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

from lmjax import config as config_lib
from lmjax.scaling.sweeps import Run, Sweep

ACTIVE = "ACTIVE"
UNKNOWN = "UNKNOWN"  # gcloud could not describe the queued resource: it does not exist (any more)
# TPU VM software versions per generation (Cloud TPU docs), used when --runtime_version=auto.
RUNTIMES = {"v4": "tpu-ubuntu2204-base", "v5litepod": "v2-alpha-tpuv5-lite", "v5e": "v2-alpha-tpuv5-lite",
            "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
# Queued-resource / node states after which the slice is gone and the run must be queued again.
LOST = ("PREEMPTED", "SUSPENDING", "SUSPENDED", "FAILED", "TERMINATED", UNKNOWN)
# How one attempt (one slice, or one start on a reused slice) ended.
COMPLETED, REQUEUE, RESTART, CRASHED, NO_CAPACITY, FAILED = (
    "completed", "requeue", "restart", "crashed", "no capacity", "failed")
SSH_FAILED = 255  # ssh's own exit status: no connection, or it dropped


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
    active_timeout_s: float = 4 * 3600.0  # longest wait for a queued slice to become ACTIVE
    max_attempts: int = 5  # slices requested (and restarts) per run before giving up

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError(f"--max_attempts must be at least 1, got {self.max_attempts}")
        for name in ("poll_seconds", "active_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must not be negative, got {getattr(self, name):g}")

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


def run_files(run: Run) -> str:
    """Where a worker keeps the trainer's .log, .pid and .rc: a path for use inside double quotes."""
    return "$HOME/lmjax-run/" + re.sub(r"[^A-Za-z0-9_.@-]+", "_", run.name)


def install_command(opts: TpuOptions) -> str:
    """Run on every worker: fetch lmjax (or update it) and install it with the TPU extra."""
    return (f"(test -d ~/lmjax || git clone {shlex.quote(opts.repo_url)} ~/lmjax) && cd ~/lmjax && git pull --ff-only "
            f"&& {opts.python} -m pip install -q -e '.[tpu,gcs]'")


def train_command(opts: TpuOptions, sweep: Sweep, run: Run) -> str:
    flags = sweep.config_flags(run) + [f"--workdir={workdir(opts, run)}"]
    return shlex.join([opts.python, "-m", "lmjax.main", *flags])


def launch_command(opts: TpuOptions, sweep: Sweep, run: Run) -> str:
    """Run on every worker: start the trainer detached (nohup, its pid kept) unless it is running.

    The exit status is written to a temporary file and renamed, so a poll never reads half of it.
    """
    files = run_files(run)
    detached = (f'{train_command(opts, sweep, run)} >> "{files}.log" 2>&1; '
                f'echo $? > "{files}.rc.tmp"; mv "{files}.rc.tmp" "{files}.rc"')
    return (f'mkdir -p "$HOME/lmjax-run" && cd ~/lmjax && '
            f'if kill -0 "$(cat "{files}.pid" 2>/dev/null)" 2>/dev/null; then echo "{run.name}: running already"; '
            f'else rm -f "{files}.rc"; nohup sh -c {shlex.quote(detached)} > /dev/null 2>&1 < /dev/null & '
            f'echo $! > "{files}.pid"; fi')


def status_command(run: Run) -> str:
    """Run on worker 0: prints the trainer's exit status, `running`, or `gone` (no status, no process)."""
    files = run_files(run)
    return (f'cat "{files}.rc" 2>/dev/null || {{ kill -0 "$(cat "{files}.pid" 2>/dev/null)" 2>/dev/null '
            f'&& echo running; }} || echo gone')


def gcloud_argv(action: str, opts: TpuOptions, node: str = "", command: str = "", path: str = "",
                accelerator: str | None = None, worker: str = "all") -> list[str]:
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
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *where, f"--worker={worker}",
                f"--command={command}"]
    if action == "delete":
        return qr + ["delete", node, *where, "--force", "--quiet"]
    if action == "cat":
        return ["gcloud", "storage", "cat", path]
    raise ValueError(f"unknown gcloud action {action!r}")


def _gcloud(argv: list[str], capture: bool = False, echo: bool = True) -> subprocess.CompletedProcess:
    """Run gcloud; polls pass echo=False so a day-long run does not print a line every few seconds."""
    if echo:
        print("$ " + shlex.join(argv), flush=True)
    return subprocess.run(argv, capture_output=capture, text=True)


def _state(opts: TpuOptions, node: str) -> str:
    """The queued resource's state; UNKNOWN when gcloud cannot describe it (it does not exist)."""
    result = _gcloud(gcloud_argv("state", opts, node), capture=True, echo=False)
    return (result.stdout.strip().upper() or UNKNOWN) if result.returncode == 0 else UNKNOWN


def _completed(opts: TpuOptions, run: Run) -> bool:
    result = _gcloud(gcloud_argv("cat", opts, path=f"{workdir(opts, run)}/summary.json"), capture=True, echo=False)
    if result.returncode != 0:
        return False
    try:
        return json.loads(result.stdout).get("completed") is True
    except (json.JSONDecodeError, AttributeError):
        return False


def _training_status(opts: TpuOptions, node: str, run: Run) -> int | str:
    """The trainer's exit status on worker 0, or `running`, `gone`, or `unreachable` (ssh failed)."""
    result = _gcloud(gcloud_argv("ssh", opts, node, status_command(run), worker="0"), capture=True, echo=False)
    if result.returncode != 0:
        return "unreachable"
    lines = result.stdout.strip().splitlines()  # the last line: ssh may print a banner before it
    last = lines[-1].strip() if lines else "running"
    if last.isdigit():
        return int(last)
    return "running" if last == "running" else "gone"


def _wait_active(opts: TpuOptions, node: str) -> str:
    """Poll until ACTIVE, lost, or --active_timeout_s has passed; returns the last state seen."""
    deadline = time.monotonic() + opts.active_timeout_s
    while True:
        state = _state(opts, node)
        if state == ACTIVE or state in LOST or time.monotonic() >= deadline:
            return state
        time.sleep(opts.poll_seconds)


def _poll_training(opts: TpuOptions, node: str, run: Run) -> str:
    """Wait for the detached trainer to finish or its slice to go; returns how the attempt ended.

    The exit status is read first, so the summary and state read after it describe the moment the
    trainer stopped.
    """
    said_unreachable = False
    while True:
        status = _training_status(opts, node, run)
        if _completed(opts, run):
            print(f"{run.name}: completed", flush=True)
            return COMPLETED
        state = _state(opts, node)
        if state != ACTIVE:
            print(f"{run.name}: slice {state}; re-queueing (training resumes from its checkpoint)", flush=True)
            return REQUEUE
        if status == "unreachable" and not said_unreachable:
            print(f"{run.name}: ssh to {node} failed; polling again", flush=True)
            said_unreachable = True
        if status == 0 or status == "gone":
            how = "exited 0" if status == 0 else "vanished"
            print(f"{run.name}: trainer {how} without a completed summary.json on a healthy slice (a maintenance "
                  "SIGTERM?); starting it again, it resumes from its checkpoint", flush=True)
            return RESTART
        if isinstance(status, int):
            print(f"{run.name}: trainer crashed (exit {status}) on a healthy slice; not retrying. "
                  f"Its log is {run_files(run).replace('$HOME', '~')}.log on the workers", flush=True)
            return CRASHED
        time.sleep(opts.poll_seconds)


def _attempt(sweep: Sweep, run: Run, opts: TpuOptions, node: str, attempt: int) -> str:
    """One slice (new or reused) and one start of the trainer on it; returns how it ended."""
    state = _state(opts, node)
    if state in LOST:
        if state != UNKNOWN:
            _gcloud(gcloud_argv("delete", opts, node))
        print(f"{run.name}: requesting {run.accelerator or opts.accelerator_type} as {node} "
              f"(attempt {attempt} of {opts.max_attempts})", flush=True)
        if _gcloud(gcloud_argv("create", opts, node, accelerator=run.accelerator)).returncode != 0:
            print(f"{run.name}: queued-resources create failed", flush=True)
            return FAILED
    else:
        print(f"{run.name}: reusing {node} (state {state}, attempt {attempt} of {opts.max_attempts})", flush=True)
        if state == ACTIVE and _training_status(opts, node, run) == "running":
            print(f"{run.name}: its trainer is running on {node} already; waiting for it", flush=True)
            return _poll_training(opts, node, run)
    state = _wait_active(opts, node)
    if state in LOST:
        print(f"{run.name}: slice {state} before it became ACTIVE; re-queueing", flush=True)
        return REQUEUE
    if state != ACTIVE:
        print(f"{run.name}: no capacity: {node} still {state} after --active_timeout_s={opts.active_timeout_s:g}; "
              "deleting it and giving up (run the sweep again to queue it anew)", flush=True)
        return NO_CAPACITY
    for command in (install_command(opts), launch_command(opts, sweep, run)):
        code = _gcloud(gcloud_argv("ssh", opts, node, command)).returncode
        if code != 0:
            state = _state(opts, node)
            if state != ACTIVE:
                print(f"{run.name}: slice {state}; re-queueing", flush=True)
                return REQUEUE
            if code == SSH_FAILED:
                print(f"{run.name}: ssh to {node} failed; trying again", flush=True)
                return RESTART
            print(f"{run.name}: setting up the workers failed (exit {code}) on a healthy slice; not retrying",
                  flush=True)
            return FAILED
    print(f"{run.name}: training on {node}; log in ~/lmjax-run/ on each worker", flush=True)
    return _poll_training(opts, node, run)


def run_one(sweep: Sweep, run: Run, opts: TpuOptions) -> bool:
    """Drive one run to a completed summary on as many slices as preemptions require; True on success."""
    node = node_name(sweep, run)
    if _completed(opts, run):
        print(f"{run.name}: finished already, skipped", flush=True)
        if _state(opts, node) != UNKNOWN:  # left up by a launcher interrupted after the run completed
            _gcloud(gcloud_argv("delete", opts, node))
        return True
    try:
        for attempt in range(1, opts.max_attempts + 1):
            outcome = _attempt(sweep, run, opts, node, attempt)
            if outcome == COMPLETED:
                return True
            if outcome in (CRASHED, NO_CAPACITY, FAILED):
                return False
        print(f"{run.name}: gave up after {opts.max_attempts} attempts", flush=True)
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

        config = config_lib.load(sweep.base_config, {**sweep.overrides, **run.overrides})
        report = check_fits(config, accelerator, num_slices=1)
    except (ImportError, RuntimeError) as e:
        raise ValueError(f"--preflight could not compile {run.name} for {accelerator}: {e}") from None
    return None if report.fits else report.message


def print_dry_run(sweep: Sweep, opts: TpuOptions) -> None:
    for run in sweep.runs:
        node = node_name(sweep, run)
        summary = gcloud_argv("cat", opts, path=f"{workdir(opts, run)}/summary.json")
        steps = [
            ("finished already?", [summary]),
            ("request a slice, wait until ACTIVE", [gcloud_argv("state", opts, node),
                                                    gcloud_argv("create", opts, node, accelerator=run.accelerator),
                                                    gcloud_argv("state", opts, node)]),
            ("install, start training detached", [gcloud_argv("ssh", opts, node, install_command(opts)),
                                                  gcloud_argv("ssh", opts, node, launch_command(opts, sweep, run))]),
            ("poll until the summary says completed", [gcloud_argv("ssh", opts, node, status_command(run), worker="0"),
                                                       summary, gcloud_argv("state", opts, node)]),
            ("at the end", [gcloud_argv("delete", opts, node)]),
        ]
        print(f"# {run.name}")
        for what, argvs in steps:
            print(f"# {what}")
            for argv in argvs:
                print(shlex.join(argv))


def run_sweep(sweep: Sweep, opts: TpuOptions, parallel: int = 1, dry_run: bool = False,
              check: bool = False, slices: int = 0) -> list[str]:
    """Every run on its own slice, `parallel` slices at a time, or with `slices` > 0 on pools of that
    many long-lived slices (`launch.slice_pool`); returns the names of failed runs."""
    from launch import slice_pool  # it builds on this module

    if dry_run:
        if slices:
            slice_pool.print_plan(sweep, opts, slices)
        else:
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
    if slices:
        return failed + slice_pool.run_sweep(sweep, opts, slices, runs)
    with ThreadPoolExecutor(max(1, parallel)) as pool:
        results = list(pool.map(lambda r: run_one(sweep, r, opts), runs))
    return failed + [r.name for r, ok in zip(runs, results) if not ok]
