"""Scaling laws: sweeps that ask for model sizes, and the Kaplan and Chinchilla fits of their results.

- `shapes`: target non-embedding parameter count -> depth, width, heads (fixed aspect ratio).
- `sweeps`: IsoFLOP, grid and size-only run lists with stable names; the `Sweep` a sweep file returns
  (the generators stay in their module: `sweeps.kaplan` would shadow the `kaplan` fits module).
- `kaplan`: L(N), L(D), L(C_min) power laws.
- `chinchilla`: approach 2 (IsoFLOP parabolas) and approach 3 (parametric L(N, D) by batched L-BFGS).
- `envelope`: approach 1 (the envelope of minimal loss over training curves).
- `predict`: each approach's compute-optimal N, D and loss at an unseen budget, with bootstrap intervals.
- `plots`: the figures (imported on its own, as it loads matplotlib).
"""

from lmjax.scaling.chinchilla import IsoFlopFit, ParametricFit, fit_isoflop, fit_parametric
from lmjax.scaling.envelope import EnvelopeFit, fit_envelope
from lmjax.scaling.kaplan import PowerLaw, fit_loss_vs_compute, fit_loss_vs_params, fit_loss_vs_tokens, fit_power_law
from lmjax.scaling.shapes import Shape, shape_for_params
from lmjax.scaling.sweeps import Run, Sweep, load_sweep

__all__ = [
    "IsoFlopFit", "ParametricFit", "fit_isoflop", "fit_parametric", "EnvelopeFit", "fit_envelope", "PowerLaw",
    "fit_loss_vs_compute", "fit_loss_vs_params", "fit_loss_vs_tokens", "fit_power_law", "Shape", "shape_for_params", "Run", "Sweep",
    "load_sweep",
]
