"""Joining the other processes of a multi-host run: `jax.distributed.initialize()` before any device is used.

Whether to join is JAX's own question, and JAX already knows how to answer it: its cluster registry
(`jax._src.clusters`) recognises a Cloud TPU VM through the GCE metadata server (a plain pod slice
sets no environment variable that says so), GKE TPU pods, Slurm, Open MPI and Kubernetes. We ask
that registry the same question `jax.distributed.initialize()` would ask it, for one reason: where
no environment answers (a laptop) the call must be skipped, because it would fail for want of a
coordinator address. Anywhere else (several CPU processes on one machine, multi-node GPU without a
scheduler) set JAX_COORDINATOR_ADDRESS=host:port, JAX_NUM_PROCESSES and JAX_PROCESS_ID on every
process.

A single-host TPU VM joins too, as a run of one process: that is what gives it JAX's preemption
service (see `lmjax.train.preemption`).
"""

from __future__ import annotations

import os

import jax
from jax._src import clusters

EXPLICIT = "explicit"
_EXPLICIT_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def cluster_kind() -> str | None:
    """Which environment says this process belongs to a distributed run, or None.

    "explicit" when JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are all set;
    otherwise the name of the first cluster environment JAX detects, in JAX's own order and
    skipping the opt-in-only ones (mpi4py) as JAX does: "ompi", "slurm", "gcetpu", "gketpu", "k8s".
    Some of those are only partly set by the variables above: JAX fills in the rest from the cluster.
    Detecting "gcetpu" queries the metadata server, which only happens on a machine with TPU chips.
    """
    explicit = [var for var in _EXPLICIT_VARS if os.environ.get(var)]
    if len(explicit) == len(_EXPLICIT_VARS):
        return EXPLICIT
    env = _detected_cluster()
    if env is not None:
        return _kind(env)
    if explicit:
        missing = [var for var in _EXPLICIT_VARS if var not in explicit]
        raise ValueError(
            f"{', '.join(explicit)} set but not {' and '.join(missing)}: outside a cluster JAX recognises "
            "(Cloud TPU VM, GKE, Slurm, Open MPI, Kubernetes) every process needs all of "
            f"{', '.join(_EXPLICIT_VARS)}"
        )
    return None


def initialize() -> str | None:
    """Starts JAX's multi-process runtime if this process is part of a distributed run.

    Must run before anything touches the devices; does nothing if the runtime is already up or no
    environment asks for it. Returns the `cluster_kind` it initialized for, or None.
    """
    if jax.distributed.is_initialized():
        return None
    kind = cluster_kind()
    if kind is None:
        return None
    settings = {
        key: int(os.environ[var])
        for key, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
        if os.environ.get(var)
    }
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        settings["coordinator_address"] = os.environ["JAX_COORDINATOR_ADDRESS"]
    # Explicit settings are the whole truth: detection would also restrict the visible devices on
    # Slurm/Open MPI nodes. Otherwise name the environment found above, so JAX uses that one.
    method = "deactivate" if kind == EXPLICIT else _detection_method(kind)
    jax.distributed.initialize(cluster_detection_method=method, **settings)
    return kind


def _detected_cluster() -> type[clusters.ClusterEnv] | None:
    """The environment `jax.distributed.initialize()` would pick when given no arguments."""
    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env
    return None


def _kind(env: type[clusters.ClusterEnv]) -> str:
    """JAX's name for a cluster environment; its Kubernetes one has none, so it is called "k8s"."""
    return env.name or env.__name__.removesuffix("Cluster").lower()


def _detection_method(kind: str) -> str | None:
    """The `cluster_detection_method` that selects `kind`; None (JAX's default order, which found
    it first) for an environment JAX gives no name."""
    return next((env.name for env in clusters.ClusterEnv._cluster_types if env.name and env.name == kind), None)
