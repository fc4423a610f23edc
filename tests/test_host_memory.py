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
    applied = host_memory.share_one_heap(int(sys.argv[1]))
    worker = threading.Thread(target=lambda: bytearray(1 << 20))  # 1 MiB: malloc'd by the new thread
    worker.start()
    worker.join()
    print(applied, flush=True)
    ctypes.CDLL("libc.so.6").malloc_stats()  # one "Arena N:" block per heap, on stderr
""")


def test_threads_share_the_main_heap_only_when_a_step_buffer_nears_a_thread_heap():
    from lmjax import config as config_lib
    from lmjax import host_memory

    config = config_lib.load("configs/gpt_small.py")  # 32 x 128 tokens, vocabulary 4096
    assert host_memory.logits_bytes(config) == 4 * 32 * 128 * 4096
    config.train.microbatches = 4
    assert host_memory.logits_bytes(config) == 4 * 8 * 128 * 4096

    heaps = {}
    for size in (1 << 20, 64 << 20):
        result = subprocess.run([sys.executable, "-c", THREADS_SCRIPT, str(size)], capture_output=True, text=True,
                                timeout=120, env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert result.returncode == 0, result.stderr
        heaps[size] = (result.stdout.strip(), result.stderr.count("Arena "))
    assert heaps[1 << 20] == ("False", 2)  # the thread got a heap of its own
    assert heaps[64 << 20] == ("True", 1)  # it allocated from the main heap


BIG_SCRIPT = textwrap.dedent("""
    import resource
    import jax, jax.numpy as jnp
    from lmjax import host_memory

    assert host_memory.reuse_freed_host_memory()
    fill = jax.jit(lambda v: jnp.full((9 << 25,), v, jnp.float32))  # 1.125 GiB, freed when dropped
    counts = []
    for i in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        fill(float(i)).block_until_ready()
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sorted(counts[-3:])[1])
""")


def test_a_freed_buffer_over_a_gibibyte_is_kept_for_the_next_call():
    """The largest steps free more than any fixed trim threshold glibc could keep: it keeps them all."""
    result = subprocess.run([sys.executable, "-c", BIG_SCRIPT], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[-1]) < 0.05 * (9 << 27) / 4096  # pages of one output
