"""On one core of a CPU-only host, XLA runs lmjax's dots itself instead of through YNNPACK."""

import os
import subprocess
import sys
import textwrap

import pytest

# A fresh process: XLA reads XLA_FLAGS once, when JAX starts its backend.
SCRIPT = textwrap.dedent("""
    import os, sys
    os.sched_setaffinity(0, [int(c) for c in sys.argv[1].split(",")])
    from lmjax import cpu_dots
    applied = cpu_dots.eigen_dots_on_one_thread()
    import jax, jax.numpy as jnp
    x = jnp.ones((64, 32), jnp.float32)
    hlo = jax.jit(lambda x: x @ x.T).lower(x).compile().as_text()
    print(applied, "__ynn_fusion" in hlo, cpu_dots.eigen_dots_on_one_thread(), os.environ.get("XLA_FLAGS", ""))
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
    applied, ynn, again, flags = run("0", "--xla_cpu_enable_fast_math=false")
    assert (applied, ynn, again) == ("True", "False", "True")
    assert flags.split() == ["--xla_cpu_enable_fast_math=false", "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_two_cores_and_a_users_own_setting_keep_ynnpacks_dots():
    assert run("0,1")[:2] == ["False", "True"]
    user = "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    assert run("0", user)[:2] == ["False", "True"]
