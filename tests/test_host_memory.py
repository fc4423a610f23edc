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
