"""Model FLOPs utilization: the share of the devices' peak that the model's own math uses.

MFU = tokens/s * flops_per_token / (num_devices * peak FLOP/s per device). The FLOPs are the
model's analytic training FLOPs (`lmjax.model.flops_per_token`, attention counted), not what the
compiler happened to execute, so rematerialization and padding count as overhead, not as work.
"""

from collections.abc import Sequence
from typing import Any

import jax

from lmjax import hardware


def mfu(
    tokens_per_sec: float,
    flops_per_token: float,
    devices: Sequence[Any] | None = None,
    peak_flops_per_device: float | None = None,
) -> float:
    """Fraction of peak (0..1) over `devices` (default: all); the peak comes from
    `lmjax.hardware.peak_flops_per_device` unless given."""
    devices = list(jax.devices() if devices is None else devices)
    if peak_flops_per_device is None:
        peak_flops_per_device = hardware.peak_flops_per_device(devices[0])
    return tokens_per_sec * flops_per_token / (len(devices) * peak_flops_per_device)
