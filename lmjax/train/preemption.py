"""Stopping cleanly on SIGTERM (TPU VM preemption, `kill`): the loop saves a checkpoint and exits 0.

Usage: `with stop_on_sigterm() as sigterm:` around the loop, and `preempted(sigterm, step)` after
every step. Which mechanism answers depends on whether this process joined JAX's distributed
runtime (`lmjax.distributed.initialize`: every multi-host run, and a single Cloud TPU VM host):

- Joined: JAX's preemption sync point. `jax.distributed.initialize()` creates the preemption sync
  manager for any number of processes, one included (unless `jax_enable_preemption_service` is
  off), and that manager's "sigterm" notifier installs a C-level SIGTERM handler (`std::signal` in
  XLA's tsl/distributed_runtime/preemption/preemption_notifier.cc) that a thread polls every second.
  On a notice, every process sends its last step to the coordination service and all agree to stop
  at the largest plus one, so every host saves the same step. No Python handler may be installed
  then: it would replace JAX's, and the sync point would never come.
- Not joined (a laptop, one GPU box): a Python SIGTERM handler sets a flag.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

import jax
from jax.experimental import multihost_utils


def uses_sync_point() -> bool:
    """Whether JAX's preemption service (not our own handler) watches for SIGTERM in this process."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def preempted(sigterm: list[bool], step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process).

    Our flag is read once per step, so a signal arriving later is seen after the next step; the sync
    point needs every process to call this at every step with the same step numbers.
    """
    if uses_sync_point():
        return multihost_utils.reached_preemption_sync_point(step)
    return sigterm[0]


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[list[bool]]:
    """A one-element flag for `preempted`; set by SIGTERM unless JAX's preemption service handles it."""
    flag = [False]
    if uses_sync_point():
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.__setitem__(0, True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
