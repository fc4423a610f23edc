"""Stopping cleanly on SIGTERM (TPU VM preemption, `kill`): the loop saves a checkpoint and exits 0."""

from __future__ import annotations

import contextlib
import signal
from typing import Iterator

import jax
from jax.experimental import multihost_utils


def preempted(sigterm: list[bool], step: int) -> bool:
    """Whether to save and stop after `step`. One process: our SIGTERM flag (read once, so a signal
    arriving later waits for the next step). Several: JAX's preemption sync point, which makes all
    hosts agree on the same step although each receives the signal at a different moment."""
    if jax.process_count() == 1:
        return sigterm[0]
    return multihost_utils.reached_preemption_sync_point(step)


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[list[bool]]:
    """A flag set by SIGTERM: the loop checks it after every step.

    Multi-process runs leave SIGTERM to JAX's preemption service (see `preempted`).
    """
    flag = [False]
    if jax.process_count() > 1:
        yield flag
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: flag.__setitem__(0, True))
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)
