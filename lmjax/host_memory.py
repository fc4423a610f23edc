"""Host memory that a CPU step reuses instead of faulting in afresh at every call.

XLA's CPU runtime allocates a step's temporary buffers with malloc at every call and
frees them at its end. glibc serves large requests with their own `mmap` and returns them with `munmap`
on free, so each call of a compiled step touches brand-new pages and takes a page fault for every 4 KiB
of them; for a small model the kernel's faulting and zeroing of those pages is a large share of the
step. PyTorch's eager ops allocate one tensor at a time, small enough for glibc to reuse from its heap,
so they do not pay this. `reuse_freed_host_memory()` turns off glibc's per-allocation `mmap` and raises
the threshold above which it gives a freed heap top back to the system, so the next call reuses the
pages this one freed. The process then holds on to its peak heap, as any caching allocator does. glibc
still maps afresh a request larger than a thread's heap (64 MiB) made off the main thread: the
temporaries of larger models, whose longer steps make the page faults a smaller share.

It applies only on the CPU backend: there arrays and temporaries live in host memory; an accelerator's
live in device memory, and its hosts keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import jax

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_MAX = -4
TRIM_THRESHOLD_BYTES = 1 << 30  # free heap kept at the top before glibc trims it


@functools.cache
def reuse_freed_host_memory() -> bool:
    """On the CPU backend with glibc, makes malloc serve every size from its heap and keep what a step
    frees for the next one. Returns whether it applied (once per process; later calls repeat the answer)."""
    if jax.default_backend() != "cpu":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows): its allocator keeps its own policy
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))

