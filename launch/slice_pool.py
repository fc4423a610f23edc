"""`launch.sweep --backend=tpu-vm --slices=K`: K slices that stay up and take the sweep's runs in turn.

Requesting a slice (a queued resource) and installing lmjax on it costs minutes, often more than a
small run of a scaling sweep, so a 50-run sweep should not create and delete 50 slices. Here each
accelerator type gets a pool of up to K slices with stable names (`node_name`); each slice takes the
next unfinished run off its pool's queue, trains it to a completed summary.json, and takes the next.

- A slice that is preempted (or otherwise leaves ACTIVE) is deleted and requested again; its run goes
  back to the front of the queue, and whichever slice takes it resumes it from its checkpoint (every
  start uses the same command and workdir).
- A trainer that exits 0 without completing on a healthy slice (a maintenance SIGTERM) is queued
  again the same way; one that crashes fails its run, and the slice moves on to the next run.
- --max_attempts bounds the starts per run (and the slices a slot requests in a row that are lost
  before they become ACTIVE). A slice that stays queued past --active_timeout_s is deleted and its
  slot closes; its run goes back to the queue for the other slices, and runs left when every slot
  has closed fail (no capacity). Whatever happens, a run that did not complete is reported failed.
- Every slice is deleted at the end, and on Ctrl-C (no slice is requested after it); one left up by
  a launcher that was killed outright is replaced when its slot starts.

The per-run steps (status, polling, commands) are the tpu-vm backend's (`launch.tpu_vm`).
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import re
import shlex
import threading

from launch import tpu_vm
from launch.tpu_vm import ACTIVE, COMPLETED, CRASHED, LOST, REQUEUE, RESTART, SSH_FAILED, UNKNOWN, TpuOptions
from lmjax.scaling.sweeps import Run, Sweep


def node_name(sweep: Sweep, accelerator: str, index: int) -> str:
    """A valid TPU name, stable per sweep, accelerator type and slot."""
    digest = hashlib.sha1(f"{sweep.name}/{accelerator}/{index}".encode()).hexdigest()[:6]
    stem = re.sub(r"[^a-z0-9-]+", "-", f"lmjax-{sweep.name}-{accelerator}".lower()).strip("-")
    return f"{stem[:46].rstrip('-')}-s{index}-{digest}"


@dataclasses.dataclass
class _Pool:
    """The queue of one accelerator type and the state its slices share."""

    sweep: Sweep
    opts: TpuOptions
    accelerator: str
    queue: collections.deque  # runs not yet completed, next first
    stop: threading.Event
    lock: threading.Lock  # shared by all pools: guards the queues, `live` and every create
    live: set  # slices that exist (or are being requested), across pools
    starts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    completed: list = dataclasses.field(default_factory=list)
    failed: list = dataclasses.field(default_factory=list)

    def take(self) -> Run | None:
        with self.lock:
            return None if self.stop.is_set() or not self.queue else self.queue.popleft()

    def again(self, run: Run, why: str) -> None:
        """Back to the front of the queue, unless it has had its --max_attempts starts."""
        with self.lock:
            if self.starts[run.name] >= self.opts.max_attempts:
                print(f"{run.name}: {why}; gave up after {self.opts.max_attempts} attempts", flush=True)
                self.failed.append(run.name)
            else:
                print(f"{run.name}: {why}; back in the queue (it resumes from its checkpoint)", flush=True)
                self.queue.appendleft(run)


def _delete(pool: _Pool, node: str) -> None:
    tpu_vm._gcloud(tpu_vm.gcloud_argv("delete", pool.opts, node))
    with pool.lock:
        pool.live.discard(node)


def _bring_up(pool: _Pool, node: str) -> str:
    """Request the slot's slice, wait until ACTIVE, install; returns the state it ended in.

    A slice of this name left up by an earlier launcher (killed before it could delete it) is deleted
    first: a trainer may still run there, and a second one beside it would not get the chips. Its
    run resumes from its checkpoint when a slice takes it.
    """
    opts = pool.opts
    with pool.lock:  # Ctrl-C deletes what `live` holds: nothing may be requested after it
        if pool.stop.is_set():
            return UNKNOWN
        state = tpu_vm._state(opts, node)
        if state != UNKNOWN:
            print(f"slot {node}: left up ({state}) by an earlier launcher; replacing it", flush=True)
            tpu_vm._gcloud(tpu_vm.gcloud_argv("delete", opts, node))
        print(f"slot {node}: requesting {pool.accelerator}", flush=True)
        pool.live.add(node)
        if tpu_vm._gcloud(tpu_vm.gcloud_argv("create", opts, node, accelerator=pool.accelerator)).returncode:
            return "create failed"
    state = tpu_vm._wait_active(opts, node)
    if state != ACTIVE:
        return state
    code = tpu_vm._gcloud(tpu_vm.gcloud_argv("ssh", opts, node, tpu_vm.install_command(opts))).returncode
    return ACTIVE if code == 0 else tpu_vm._state(opts, node) if code == SSH_FAILED else f"install exit {code}"


def _serve(pool: _Pool, node: str) -> None:
    """One slot: bring its slice up, train runs off the queue on it until the queue is empty."""
    up, lost_early = False, 0
    try:
        while (run := pool.take()) is not None:
            if not up:
                state = _bring_up(pool, node)
                if state != ACTIVE:
                    with pool.lock:
                        pool.queue.appendleft(run)
                    if state in LOST and lost_early < pool.opts.max_attempts and not pool.stop.is_set():
                        lost_early += 1  # lost before it was ever used: request it again
                        _delete(pool, node)
                        continue
                    print(f"slot {node}: {state}; closing this slot, {run.name} goes back to the queue", flush=True)
                    return
                up, lost_early = True, 0
            with pool.lock:
                pool.starts[run.name] += 1
            print(f"{run.name}: training on {node} (start {pool.starts[run.name]})", flush=True)
            code = tpu_vm._gcloud(tpu_vm.gcloud_argv("ssh", pool.opts, node,
                                                     tpu_vm.launch_command(pool.opts, pool.sweep, run))).returncode
            outcome = tpu_vm._poll_training(pool.opts, node, run) if code == 0 else None
            if outcome == COMPLETED:
                pool.completed.append(run.name)
            elif outcome == CRASHED:
                pool.failed.append(run.name)
            elif pool.stop.is_set():
                return
            elif outcome == REQUEUE or tpu_vm._state(pool.opts, node) != ACTIVE:
                _delete(pool, node)
                up = False
                pool.again(run, f"slice {node} lost")
            elif outcome == RESTART:
                pool.again(run, "trainer stopped without completing on a healthy slice")
            elif code == SSH_FAILED:
                pool.again(run, f"ssh to {node} failed")
            else:
                print(f"{run.name}: starting the trainer failed (exit {code}) on a healthy slice; not retrying",
                      flush=True)
                pool.failed.append(run.name)
    finally:
        if not pool.stop.is_set() and node in pool.live:
            _delete(pool, node)


def _pools(sweep: Sweep, opts: TpuOptions, runs: list[Run], stop, lock, live) -> list[_Pool]:
    by_type: dict[str, list[Run]] = {}
    for run in runs:
        by_type.setdefault(run.accelerator or opts.accelerator_type, []).append(run)
    return [_Pool(sweep, opts, accelerator, collections.deque(queue), stop, lock, live)
            for accelerator, queue in by_type.items()]


def print_plan(sweep: Sweep, opts: TpuOptions, slices: int) -> None:
    """--dry_run: the pools, their slices and runs, and the gcloud commands of one slice's life."""
    for pool in _pools(sweep, opts, sweep.runs, None, None, None):
        nodes = [node_name(sweep, pool.accelerator, i) for i in range(min(slices, len(pool.queue)))]
        print(f"# pool {pool.accelerator}: {len(pool.queue)} runs on {len(nodes)} slice(s): {', '.join(nodes)}")
        print(f"# runs, in queue order: {', '.join(r.name for r in pool.queue)}")
        node, first = nodes[0], pool.queue[0]
        print(f"# each slice (shown for {node}): request it, wait until ACTIVE, install once")
        for argv in (tpu_vm.gcloud_argv("create", opts, node, accelerator=pool.accelerator),
                     tpu_vm.gcloud_argv("state", opts, node), tpu_vm.gcloud_argv("ssh", opts, node, tpu_vm.install_command(opts))):
            print(shlex.join(argv))
        print(f"# then per run it takes (shown for {first.name}): start it detached, poll until completed")
        for argv in (tpu_vm.gcloud_argv("ssh", opts, node, tpu_vm.launch_command(opts, sweep, first)),
                     tpu_vm.gcloud_argv("ssh", opts, node, tpu_vm.status_command(first), worker="0"),
                     tpu_vm.gcloud_argv("cat", opts, path=f"{tpu_vm.workdir(opts, first)}/summary.json")):
            print(shlex.join(argv))
        print("# when the queue is empty (or on Ctrl-C)")
        print(shlex.join(tpu_vm.gcloud_argv("delete", opts, node)))


def _wait(threads: list[threading.Thread]) -> None:
    """Join with a timeout, so that Ctrl-C reaches the main thread while the slots work."""
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)


def run_sweep(sweep: Sweep, opts: TpuOptions, slices: int, runs: list[Run] | None = None) -> list[str]:
    """Every unfinished run on pools of at most `slices` slices per accelerator type; returns failed runs."""
    runs = sweep.runs if runs is None else runs
    todo = []
    for run in runs:
        if tpu_vm._completed(opts, run):
            print(f"{run.name}: finished already, skipped", flush=True)
        else:
            todo.append(run)
    stop, lock, live = threading.Event(), threading.Lock(), set()
    pools = _pools(sweep, opts, todo, stop, lock, live)
    nodes = [(pool, node_name(sweep, pool.accelerator, i)) for pool in pools for i in range(min(slices, len(pool.queue)))]
    threads = [threading.Thread(target=_serve, args=(pool, node), name=f"slot {node}", daemon=True)
               for pool, node in nodes]
    for thread in threads:
        thread.start()
    try:
        _wait(threads)
    except KeyboardInterrupt:
        stop.set()
        with lock:
            left = sorted(live)
        print(f"interrupted: deleting {len(left)} slice(s)", flush=True)
        for node in left:
            tpu_vm._gcloud(tpu_vm.gcloud_argv("delete", opts, node))
        with lock:
            live.clear()
        raise
    for pool in pools:
        for run in pool.queue:
            print(f"{run.name}: no slice of {pool.accelerator} became ACTIVE to run it", flush=True)
    completed = {name for pool in pools for name in pool.completed}
    return [run.name for run in todo if run.name not in completed]
