"""The matmul library of a CPU step, chosen by the cores XLA's compute pool will have.

XLA's CPU compiler hands each dot to YNNPACK by default. With a single compute thread its own dot
(Eigen's tensor contraction) ran nearly every matmul shape of lmjax's small models faster where we
measured, and the whole train step with it. With two threads YNNPACK's and Eigen's dots barely use
the second one at these sizes, while oneDNN's (experimental in XLA, x86 only) do, and the whole step
was faster with them at every model size we compared (figures: the README's CPU section). XLA sizes
its compute pool from the cores the process may use.

`choose_dot_library()` appends the flags to XLA_FLAGS on a CPU-only host: Eigen's dots
(`--xla_cpu_experimental_ynn_fusion_type=-individual_dot`, YNNPACK's fused reductions stay) for one
usable core, oneDNN's (`--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_fusion_type=individual_dot`)
for more on x86. It must run before JAX starts its backend, and it leaves XLA_FLAGS that already
choose a dot library alone. An accelerator's compiler does not read these flags.
"""

from __future__ import annotations

import os
import platform

from lmjax import host_memory

YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
ONEDNN_FLAG = "--xla_cpu_use_onednn"
LIBRARY_FLAGS = {
    "eigen": (f"{YNN_FUSION_FLAG}=-individual_dot",),
    "onednn": (f"{ONEDNN_FLAG}=true", "--xla_cpu_experimental_onednn_fusion_type=individual_dot"),
}


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_dot_library() -> str | None:
    """Sets XLA's CPU dot library for this process's cores, before JAX starts. Returns the library
    XLA_FLAGS now asks for ("eigen" or "onednn"), or None where it leaves XLA's default."""
    flags = os.environ.get("XLA_FLAGS", "").split()
    for name, library_flags in LIBRARY_FLAGS.items():
        if all(flag in flags for flag in library_flags):
            return name
    if (any(flag.startswith((YNN_FUSION_FLAG, ONEDNN_FLAG)) for flag in flags) or not host_memory.cpu_only_host()
            or host_memory.backend_started()):
        return None
    if usable_cores() == 1:
        name = "eigen"
    elif platform.machine().lower() in ("x86_64", "amd64"):
        name = "onednn"
    else:
        return None
    os.environ["XLA_FLAGS"] = " ".join(flags + list(LIBRARY_FLAGS[name]))
    return name
