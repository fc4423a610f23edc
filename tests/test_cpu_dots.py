"""A CPU-only host's dot library by its cores: XLA's own (Eigen) on one, oneDNN on more (x86)."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

# A fresh process: XLA reads XLA_FLAGS once, when JAX starts its backend.
SCRIPT = textwrap.dedent("""
    import os, sys
    os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(",")])
    from lmjax import cpu_dots
    chosen = cpu_dots.choose_dot_library()
    import jax, jax.numpy as jnp
    x = jnp.ones((64, 32), jnp.float32)
    hlo = jax.jit(lambda x: x @ x.T).lower(x).compile().as_text()
    library = "onednn" if "__onednn_fusion" in hlo else "ynnpack" if "__ynn_fusion" in hlo else "xla"
    print(chosen, library, cpu_dots.choose_dot_library(), os.environ.get("XLA_FLAGS", ""))
""")


def run(cores: str, xla_flags: str | None = None) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run([sys.executable, "-c", SCRIPT, cores], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split(maxsplit=3)


def test_one_core_gets_xlas_own_dots_and_the_flag_stays_once():
    chosen, library, again, flags = run("0", "--xla_cpu_enable_fast_math=false")
    assert (chosen, library, again) == ("eigen", "xla", "eigen")
    assert flags.split() == ["--xla_cpu_enable_fast_math=false", "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2 or platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="needs two cores of an x86 CPU")
def test_two_cores_get_onednn_dots_unless_the_user_chose_a_library():
    chosen, library, again, flags = run("0,1")
    assert (chosen, library, again) == ("onednn", "onednn", "onednn")
    assert flags.split() == ["--xla_cpu_use_onednn=true", "--xla_cpu_experimental_onednn_fusion_type=individual_dot"]
    user = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert run("0,1", user)[:2] == ["None", "ynnpack"]
    assert run("0", user)[:2] == ["None", "ynnpack"]
