"""The emergence sweep cut down to two sizes and 150 steps each: a check that the sweep and
`benchmarks.emergence` run end to end, for when the machine is too busy for the real one."""

import os
import runpy

from lmjax.scaling import sweeps

FULL = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "emergence.py"))


def get_sweep() -> sweeps.Sweep:
    return FULL["make"]("emergence_smoke", (38e3, 75e3), 150 * 16 * 128)
