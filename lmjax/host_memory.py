"""Host memory that a CPU step reuses instead of faulting in afresh at every call.

XLA's CPU runtime allocates a step's temporary buffers with malloc at every call and
frees them at its end. glibc serves large requests with their own `mmap` and returns them with `munmap`
on free, so each call of a compiled step touches brand-new pages and takes a page fault for every 4 KiB
of them; for a small model the kernel's faulting and zeroing of those pages is a large share of the
step. PyTorch's eager ops allocate one tensor at a time, small enough for glibc to reuse from its heap,
so they do not pay this. `reuse_freed_host_memory()` turns off glibc's per-allocation `mmap` and its
trimming of the freed top of the heap, so the next call reuses the pages this one freed. The process
then holds on to its peak heap, as any caching allocator does. No trim threshold would do: it would
have to exceed the largest step's peak, and the ~10M model's step frees over 1 GiB at once, which a
1 GiB threshold gave back and faulted in again at every call.

XLA's compute threads allocate from heaps of their own, each at most 64 MiB, which glibc maps anew
and unmaps as they fill and empty: a step whose buffers approach that size (the quickstart model's
logits are 64 MiB) faults them in again at every call whatever the settings above.
`one_heap_for_large_steps(bytes)`, called before JAX starts, makes every thread allocate from the
main heap when a step's largest buffer is that large (measured on the quickstart model: ~2M page
faults in 10 steps -> ~0.7M, all at start-up, and a ~25% faster step), and runs single-device steps
on the calling thread (JAX's CPU async dispatch off). XLA takes all of a step's temporaries as one
block (1.2 GiB for the ~10M model); dispatched asynchronously, other allocations land in that block
once it is freed, the next step's no longer fits, and the heap grows by another: the ~10M model's
process reached 5.3-6.5 GiB, against 1.8 GiB called inline (the quickstart's: 2.1-3.3 GiB against
1.0), at the same step time. Small models keep one heap per thread and asynchronous dispatch: there
one shared heap's lock cost ~5% of a step, and the blocks are small.

It applies only on the CPU backend: there arrays and temporaries live in host memory; an accelerator's
live in device memory, and its hosts keep glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os
import sys

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
NEVER_TRIM = -1  # M_TRIM_THRESHOLD of -1: glibc keeps the freed top of its heap, however large
THREAD_HEAP_BYTES = 64 << 20  # the most a glibc thread heap holds (64-bit)
ACCELERATOR_DEVICE_FILES = ("/dev/nvidia[0-9]*", "/dev/accel[0-9]*", "/dev/vfio/[0-9]*")  # GPUs, TPUs


def _mallopt():
    """glibc's mallopt, or None (not glibc: macOS, Windows and musl keep their allocator's own policy)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return None


def cpu_only_host() -> bool:
    """Whether JAX will run on the CPU, decided without starting JAX: JAX_PLATFORMS says so, or the
    machine has no GPU or TPU device files."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(glob.glob(pattern) for pattern in ACCELERATOR_DEVICE_FILES)


def logits_bytes(config) -> int:
    """Bytes of one microbatch's float32 logits, a train step's largest buffer (0 while the vocabulary
    size is unknown)."""
    vocab = config.model.vocab_size or config.data.get("vocab_size") or 0
    rows = int(config.train.batch_size) // max(1, int(config.train.microbatches))
    return 4 * rows * int(config.data.seq_len) * int(vocab)


def backend_started() -> bool:
    """Whether JAX has created its backends (after which its CPU client and thread settings are fixed)."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


@functools.cache
def one_heap_for_large_steps(largest_buffer_bytes: int) -> bool:
    """On a CPU-only host with glibc, when a step's largest buffer is at least half a thread heap:
    every thread allocates from the main heap, and single-device steps run on the calling thread
    (unless JAX_CPU_ENABLE_ASYNC_DISPATCH says otherwise). Must run before JAX starts its backend.
    Returns whether it applied."""
    mallopt = _mallopt()
    if (largest_buffer_bytes < THREAD_HEAP_BYTES // 2 or not cpu_only_host() or mallopt is None
            or backend_started()):
        return False
    if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
        import jax

        jax.config.update("jax_cpu_enable_async_dispatch", False)
    return bool(mallopt(_M_ARENA_MAX, 1))


@functools.cache
def reuse_freed_host_memory() -> bool:
    """On the CPU backend with glibc, makes malloc serve every size from its heap and keep what a step
    frees for the next one. Returns whether it applied (once per process; later calls repeat the answer)."""
    import jax

    mallopt = _mallopt()
    if mallopt is None or jax.default_backend() != "cpu":
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, NEVER_TRIM))

