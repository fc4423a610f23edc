"""Learning-rate schedules: linear warmup from 0, then cosine, linear, constant or WSD.

All schedules count optimizer steps from 0, reach the peak `optim.lr` at step `warmup_steps`, and
(except constant) end at `lr * min_lr_ratio` at step `total_steps`; they stay there afterwards.

WSD (warmup-stable-decay) holds the peak until the last `decay_fraction` of the steps and then
decays linearly. Because the stable phase does not depend on the run length, a checkpoint taken
in it can be decayed to serve any shorter token budget, which is what a scaling sweep wants.
"""

from typing import Any

import optax

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def make_schedule(optim_cfg: Any, total_steps: int) -> optax.Schedule:
    """The schedule named by `config.optim.schedule` over `total_steps` optimizer steps."""
    peak = float(optim_cfg.lr)
    final = peak * float(optim_cfg.min_lr_ratio)
    warmup = int(optim_cfg.warmup_steps)
    if not 0 <= warmup <= total_steps:
        raise ValueError(
            f"config.optim.warmup_steps={warmup} must lie in [0, total steps={total_steps}]."
        )
    after_warmup = total_steps - warmup
    name = optim_cfg.schedule
    if name == "cosine":
        main = optax.cosine_decay_schedule(peak, max(after_warmup, 1), alpha=final / peak if peak else 0.0)
    elif name == "linear":
        main = optax.linear_schedule(peak, final, max(after_warmup, 1))
    elif name == "constant":
        main = optax.constant_schedule(peak)
    elif name == "wsd":
        decay = total_steps - decay_start(optim_cfg, total_steps)
        if not 0 < decay <= after_warmup:
            raise ValueError(
                f"config.optim.decay_fraction={optim_cfg.decay_fraction} gives {decay} decay steps; "
                f"need 1..{after_warmup} (the steps after warmup)."
            )
        main = optax.join_schedules(
            [optax.constant_schedule(peak), optax.linear_schedule(peak, final, decay)],
            boundaries=[after_warmup - decay],
        )
    else:
        raise ValueError(
            f"Unknown config.optim.schedule={name!r}; expected one of {SCHEDULES}."
        )
    if warmup == 0:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def decay_start(optim_cfg: Any, total_steps: int) -> int:
    """The step where a WSD run of `total_steps` steps leaves its stable phase."""
    return total_steps - round(float(optim_cfg.decay_fraction) * total_steps)
