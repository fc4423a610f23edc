"""The matmul library of a CPU step that XLA runs on one thread.

XLA's CPU compiler hands each dot to YNNPACK by default. With a single compute thread its own dot
(Eigen's tensor contraction) ran nearly every matmul shape of lmjax's small models faster where we
measured, and the whole train step with it; with two threads neither was ahead over a step, so
there the default stays (figures: the README's CPU section). XLA sizes its compute pool from the
cores the process may use, so one usable core means one thread.

`eigen_dots_on_one_thread()` appends `--xla_cpu_experimental_ynn_fusion_type=-individual_dot` to
XLA_FLAGS (YNNPACK's fused reductions stay) when the process may use one core of a CPU-only host. It
must run before JAX starts its backend, and it leaves a fusion type the user set in XLA_FLAGS alone.
An accelerator's compiler does not read the flag.
"""

from __future__ import annotations

import os

from lmjax import host_memory

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
EIGEN_DOTS = f"{YNN_FUSION_FLAG}=-individual_dot"


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def eigen_dots_on_one_thread() -> bool:
    """Sets XLA's CPU dots to its own implementation on a one-core CPU-only host, before JAX starts.
    Returns whether XLA_FLAGS now holds that setting."""
    flags = os.environ.get("XLA_FLAGS", "")
    if EIGEN_DOTS in flags.split():
        return True
    if YNN_FUSION_FLAG in flags or usable_cores() != 1 or not host_memory.cpu_only_host() or host_memory.backend_started():
        return False
    os.environ["XLA_FLAGS"] = f"{flags} {EIGEN_DOTS}".strip()
    return True
