"""A test of the CPU demo's scaling laws at 10x its largest budget: 3e13 FLOPs, never seen by the fits.

  python -m launch.analyze --sweep_dir=runs/cpu_isoflop --isoflop_window=3 --bootstrap=200 --predict_flops=3e13
  python -m launch.sweep --sweep=configs/sweeps/cpu_extrapolate.py --sweep_dir=runs/cpu_isoflop --parallel=2
  python -m launch.analyze --sweep_dir=runs/cpu_isoflop --isoflop_window=3 --bootstrap=200 --predict_flops=3e13
  python -m launch.analyze --sweep_dir=runs/cpu_isoflop --isoflop_window=3 --out_dir=runs/cpu_isoflop/measured

The runs are the demo's (`cpu_isoflop.py`, skipped where finished in the same directory) and three
more at C = 3e13 with the same data, batch, schedule and validation: the predicted compute-optimal
size and a neighbour on each side. `--predict_flops=3e13` fits on the 14 demo runs only (it holds
the new ones out), before and after they exist; the last command fits approach 2 with the 3e13
profile included, whose parabola through the three new runs is the measured optimum.

Sizes: on the demo's results (benchmarks/results/cpu_isoflop), approach 3 and approach 2 over all
sizes put N_opt(3e13) at 5.4e5 and 5.2e5 parameters, approach 2 on windows of 3 sizes at 3.2e5. The
2-layer widths 96, 128 and 160 give 334K, 544K and 803K parameters: the middle one is the
prediction of approaches 2 and 3, the lower one covers the windowed fit, and a factor 1.5-1.6 apart
they make an IsoFLOP profile as wide as the demo's around its minimum.
"""

import os
import runpy

from lmjax import config
from lmjax.scaling import sweeps

DEMO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_isoflop.py")
BUDGET = 3e13  # 10x the demo's largest, 3e12
SIZES = (334e3, 540e3, 815e3)  # widths 96, 128, 160


def get_sweep() -> sweeps.Sweep:
    demo_file = runpy.run_path(DEMO)
    demo = demo_file["get_sweep"]()
    base = config.load(demo.base_config, demo.overrides)
    extra = sweeps.isoflop(base, [BUDGET], SIZES, demo_file["OPTIONS"])
    return sweeps.Sweep("cpu_extrapolate", demo.base_config, demo.runs + extra, demo.overrides)
