"""Freed host memory reused on CPU: a compiled call stops faulting in fresh pages for its buffers."""

import os
import subprocess
import sys
import textwrap

# Run in a fresh process: malloc's settings are process-wide and cannot be undone.
SCRIPT = textwrap.dedent("""
    import resource
    import jax, jax.numpy as jnp
    from lmjax import host_memory

    add_one = jax.jit(lambda x: x + 1.0)
    x = jnp.zeros(10 << 20, jnp.float32)  # 40 MiB: above the largest mmap threshold glibc adapts to (32 MiB)

    def faults_per_call(calls=24):
        # The median of the last 8 calls: the first call compiles, and the heap takes a few calls to
        # grow to where a freed output always has room for the next one.
        counts = []
        for _ in range(calls):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            add_one(x).block_until_ready()  # the output is freed as soon as it is dropped
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return sorted(counts[-8:])[4]

    default = faults_per_call()
    applied = host_memory.reuse_freed_host_memory()
    reused = faults_per_call()
    print(default, applied, reused, host_memory.reuse_freed_host_memory())
""")


def test_a_freed_output_is_reused_without_page_faults():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    default, applied, reused, again = result.stdout.split()
    pages = (40 << 20) / 4096
    assert applied == again == "True"
    assert float(default) > 0.5 * pages  # glibc's default: each 40 MiB output is mapped afresh
    assert float(reused) < 0.05 * pages  # after: the pages the last output freed


THREADS_SCRIPT = textwrap.dedent("""
    import ctypes, sys, threading
    from lmjax import host_memory
    applied = host_memory.one_heap_for_large_steps(int(sys.argv[1]))
    worker = threading.Thread(target=lambda: bytearray(1 << 20))  # 1 MiB: malloc'd by the new thread
    worker.start()
    worker.join()
    ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per heap, on stderr

    import jax, jax.numpy as jnp
    power = jax.jit(lambda x: jax.lax.fori_loop(0, 8, lambda _, y: y @ x / 2048, x))  # a second or so
    x = jnp.ones((2048, 2048))
    power(x).block_until_ready()  # compiled
    print(applied, power(x).is_ready(), flush=True)  # ready on return: the call ran on this thread
""")


def test_large_steps_share_the_main_heap_and_run_on_the_calling_thread():
    from lmjax import config as config_lib
    from lmjax import host_memory

    config = config_lib.load("configs/gpt_small.py")  # 32 x 128 tokens, vocabulary 4096
    assert host_memory.logits_bytes(config) == 4 * 32 * 128 * 4096
    config.train.microbatches = 4
    assert host_memory.logits_bytes(config) == 4 * 8 * 128 * 4096

    runs = {}
    env = {key: value for key, value in os.environ.items() if key != "JAX_CPU_ENABLE_ASYNC_DISPATCH"}
    for size in (1 << 20, 64 << 20):
        result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(size)], capture_output=True, text=True,
                                timeout=120, env={**env, "JAX_PLATFORMS": "cpu"})
        assert result.returncode == 0, result.stderr
        runs[size] = (result.stdout.strip(), result.stderr.count("Arena "))
    assert runs[1 << 20] == ("False False", 2)  # its own heap for the thread; the call returned at once
    assert runs[64 << 20] == ("True True", 1)  # the main heap for all; the call returned when done


BIG_SCRIPT = textwrap.dedent("""
    import ctypes, resource
    from lmjax import host_memory

    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    applied = host_memory.reuse_freed_host_memory()
    size = 9 << 27  # 1.125 GiB: more than the largest trim threshold this module ever set (1 GiB)
    counts = []
    for _ in range(3):  # one thread allocating, as in a step's own malloc and free of its largest buffer
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(applied, *counts)
""")


def test_a_freed_block_over_a_gibibyte_is_kept_for_the_next_allocation():
    """The largest steps free more than any fixed trim threshold glibc could keep: it keeps them all.

    Plain malloc and free rather than a jitted call's output: allocations between two calls can land
    in the freed block and make the heap grow instead of reusing it (fragmentation, not trimming), so
    a compiled call's page faults vary from run to run."""
    result = subprocess.run([sys.executable, "-c", BIG_SCRIPT], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    applied, first, *later = result.stdout.split()
    pages = (9 << 27) / 4096
    assert applied == "True"
    assert float(first) > 0.9 * pages  # the first allocation faults its pages in
    assert max(map(float, later)) < 0.01 * pages  # the next ones reuse them
