"""`python -m launch.sweep --sweep=configs/sweeps/X.py --backend=local|tpu-vm [--dry_run] [collect]`.

Runs every run of a sweep file, then exits non-zero listing the runs that failed. Re-running the same
command skips finished runs and resumes the rest. A trailing `collect` gathers the results instead
(the same as `python -m launch.collect --sweep_dir=DIR`).

The sweep directory defaults to `runs/<sweep name>` (local) and `gs://<BUCKET>/sweeps/<sweep name>`
(tpu-vm, where --sweep_dir must be given for a real launch). With `--backend=tpu-vm --slices=K`, up to
K slices per accelerator type stay up and take the runs in turn (`launch.slice_pool`) instead of one
slice per run. `sweep.json`, the list of runs with
their sizes, token counts and budgets, is written there for `collect` and `analyze` (for a tpu-vm
sweep, by `collect`, which reads and writes gs:// directly given the `gcs` extra).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from launch import collect, local, tpu_vm
from lmjax import fileio
from lmjax.scaling.sweeps import Sweep, load_sweep

BACKENDS = ("local", "tpu-vm")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.sweep", description=__doc__.splitlines()[0])
    p.add_argument("action", nargs="?", default="run", choices=("run", "collect"), help="run (default) or collect")
    p.add_argument("--sweep", required=True, help="sweep file defining get_sweep()")
    p.add_argument("--backend", default="local", help="local | tpu-vm")
    p.add_argument("--sweep_dir", default=None, help="where run workdirs go (gs:// for tpu-vm)")
    p.add_argument("--parallel", type=int, default=1, help="runs (or slices) at a time")
    p.add_argument("--slices", type=int, default=0,
                   help="tpu-vm: keep up to this many slices per accelerator type and feed each the next run "
                        "(0: a slice per run, --parallel at a time)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    g = p.add_argument_group("tpu-vm")
    g.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT", "<PROJECT>"))
    g.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE", "<ZONE>"))
    g.add_argument("--accelerator_type", default=tpu_vm.TpuOptions.accelerator_type, help="e.g. v5litepod-16, v4-32")
    g.add_argument("--runtime_version", default=tpu_vm.TpuOptions.runtime_version,
                   help="TPU VM software version; auto picks one per TPU generation")
    g.add_argument("--spot", action=argparse.BooleanOptionalAction, default=True, help="spot (preemptible) capacity")
    g.add_argument("--repo_url", default=tpu_vm.TpuOptions.repo_url, help="git URL of lmjax for the workers")
    g.add_argument("--poll_seconds", type=float, default=tpu_vm.TpuOptions.poll_seconds,
                   help="seconds between checks of a slice's state and its run's progress")
    g.add_argument("--active_timeout_s", type=float, default=tpu_vm.TpuOptions.active_timeout_s,
                   help="longest wait for a queued slice to become ACTIVE; then its request is deleted, the run fails")
    g.add_argument("--max_attempts", type=int, default=tpu_vm.TpuOptions.max_attempts,
                   help="slices requested (or trainer restarts) per run before giving up")
    g.add_argument("--preflight", action="store_true", help="compile each run for the slice first (lmjax.aot); refuse runs that do not fit")
    return p.parse_args(argv)


def default_sweep_dir(backend: str, sweep: Sweep) -> str:
    if backend == "local":
        return os.path.join("runs", sweep.name)
    return f"gs://<BUCKET>/sweeps/{sweep.name}"


def write_manifest(sweep: Sweep, sweep_dir: str) -> None:
    fileio.write_atomic(os.path.join(sweep_dir, collect.MANIFEST), json.dumps(sweep.manifest(), indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.backend not in BACKENDS:
        print(f"error: unknown --backend={args.backend!r}; choose one of: {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    try:
        sweep = load_sweep(args.sweep)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    sweep_dir = args.sweep_dir or default_sweep_dir(args.backend, sweep)
    if args.action == "collect":
        write_manifest(sweep, sweep_dir)  # budgets and sizes of every run, also for runs made elsewhere
        return collect.main([f"--sweep_dir={sweep_dir}"])
    print(f"sweep {sweep.name}: {len(sweep.runs)} runs, backend {args.backend}, dir {sweep_dir}", flush=True)
    if args.backend == "local":
        if not args.dry_run:
            write_manifest(sweep, sweep_dir)
        failed = local.run_sweep(sweep, sweep_dir, args.parallel, args.dry_run)
    else:
        try:
            opts = tpu_vm.TpuOptions(project=args.project, zone=args.zone, accelerator_type=args.accelerator_type,
                                     runtime_version=args.runtime_version, spot=args.spot, sweep_dir=sweep_dir,
                                     repo_url=args.repo_url, poll_seconds=args.poll_seconds,
                                     active_timeout_s=args.active_timeout_s, max_attempts=args.max_attempts)
            if args.slices < 0:
                raise ValueError(f"--slices must not be negative, got {args.slices}")
            failed = tpu_vm.run_sweep(sweep, opts, args.parallel, args.dry_run, check=args.preflight,
                                      slices=args.slices)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            if not args.slices:
                raise
            print("interrupted; every slice of the pool was deleted. Run the same command again to resume.",
                  file=sys.stderr)
            return 130
    if failed:
        print(f"{len(failed)} of {len(sweep.runs)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    if not args.dry_run:
        print(f"all {len(sweep.runs)} runs finished; next: python -m launch.collect --sweep_dir={sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
