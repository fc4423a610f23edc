"""What the hardware can do: peak bf16 FLOP/s and HBM per chip, and the named TPU slices.

MFU divides achieved model FLOP/s by these peaks, and `lmjax.aot` compiles for the slices listed here,
so both read one table. Peaks are the dense (no sparsity) bf16 figures from the vendors' spec sheets.

TPU naming trap: in `v4-N` and `v5p-N` the N counts TensorCores (two per chip, fused into one JAX
device by "megacore"), so v4-8 is 4 chips and 4 JAX devices; in `v5e-N` / `v6e-N` (one TensorCore per
chip) N counts chips.

On CPU there is no spec sheet: the peak is measured once with a jitted float32 matmul and cached on
disk (`~/.cache/lmjax/cpu_peak.json`, keyed by CPU model and core count). The environment variable
`LMJAX_CPU_PEAK_FLOPS` (whole-machine FLOP/s) overrides the measurement, e.g. in tests.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import platform
import time
from typing import Any

GiB = 1024**3
GB = 1000**3
CPU_PEAK_ENV = "LMJAX_CPU_PEAK_FLOPS"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. `kinds` are substrings of `jax.Device.device_kind` that identify it."""

    name: str
    peak_bf16_flops: float  # dense bf16 FLOP/s per chip (= per JAX device: megacore on v4/v5p)
    hbm_bytes: int
    kinds: tuple[str, ...]


# Ordered: the first chip whose kind substring matches wins, so specific names precede general ones.
CHIPS: dict[str, Chip] = {
    c.name: c
    for c in (
        # cloud.google.com/tpu/docs/v4: "Peak compute per chip (bf16) 275 TFLOPs", HBM2 32 GiB.
        Chip("v4", 275e12, 32 * GiB, ("TPU v4",)),
        # cloud.google.com/tpu/docs/v5e: "Peak compute per chip (bf16) 197 TFLOPs", HBM2 16 GB.
        Chip("v5e", 197e12, 16 * GiB, ("TPU v5 lite", "TPU v5e")),
        # cloud.google.com/tpu/docs/v5p: "Peak compute per chip (bf16) 459 TFLOPs", HBM2e 95 GB.
        Chip("v5p", 459e12, 95 * GiB, ("TPU v5p", "TPU v5")),
        # cloud.google.com/tpu/docs/v6e: "Peak compute per chip (bf16) 918 TFLOPs", HBM 32 GB.
        Chip("v6e", 918e12, 32 * GiB, ("TPU v6 lite", "TPU v6e")),
        # NVIDIA A100 datasheet: BF16 Tensor Core 312 TFLOPS dense (624 is with sparsity).
        Chip("a100-40gb", 312e12, 40 * GB, ("A100-SXM4-40GB", "A100-PCIE-40GB", "A100 40GB")),
        Chip("a100", 312e12, 80 * GB, ("A100",)),
        # NVIDIA H100 datasheet: BF16 Tensor Core 1,979 TFLOPS (SXM) / 1,513 (PCIe) *with sparsity*;
        # dense is half: 989.5 and 756.5 TFLOPS. 80 GB HBM3 (SXM), 80 GB HBM2e (PCIe).
        Chip("h100-pcie", 756.5e12, 80 * GB, ("H100 PCIe",)),
        Chip("h100", 989.5e12, 80 * GB, ("H100",)),
        # NVIDIA H200 datasheet: BF16 1,979 TFLOPS with sparsity (SXM) -> 989.5 dense; 141 GB HBM3e.
        Chip("h200", 989.5e12, 141 * GB, ("H200",)),
    )
}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A named TPU slice and the arguments `jax.experimental.topologies.get_topology_desc` needs."""

    name: str  # e.g. "v5e-16"
    chip: Chip
    topology: str  # e.g. "v5e:4x4", the topology_name get_topology_desc expects
    chip_config_name: str  # "megacore" (v4/v5p: one JAX device per chip) or "default"
    chips_per_host_bounds: tuple[int, int, int]
    wrap: tuple[bool, bool, bool]  # torus wrap-around links per dimension

    @property
    def num_chips(self) -> int:
        return _num_chips(self.topology.split(":")[1])

    @property
    def num_devices(self) -> int:
        return self.num_chips  # megacore on v4/v5p, one TensorCore per chip on v5e/v6e

    @property
    def chips_per_host(self) -> int:
        a, b, c = self.chips_per_host_bounds
        return a * b * c

    @property
    def num_hosts(self) -> int:
        return max(1, self.num_chips // self.chips_per_host)

    def topology_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `get_topology_desc(**kwargs)` (add num_slices for multislice)."""
        return dict(
            topology_name=self.topology,
            platform="tpu",
            chip_config_name=self.chip_config_name,
            chips_per_host_bounds=self.chips_per_host_bounds,
            wrap=self.wrap,
        )


def _slices() -> dict[str, TpuSlice]:
    no_wrap = (False, False, False)
    out = {}
    # v4 / v5p: 3-D torus, 4 chips (2x2x1) per host; a full 4x4x4 cube gets wrap-around links.
    # The name's number counts TensorCores, two per chip.
    for gen, prefix in (("v4", "v4"), ("v5p", "v5p")):
        for shape in ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"):
            chips = _num_chips(shape)
            wrap = (True, True, True) if shape == "4x4x4" else no_wrap
            name = f"{gen}-{2 * chips}"
            out[name] = TpuSlice(name, CHIPS[gen], f"{prefix}:{shape}", "megacore", (2, 2, 1), wrap)
    # v5e / v6e: 2-D torus, one TensorCore per chip, the number counts chips. The 8-chip slice is a
    # single 8-chip host; larger slices use 4-chip (2x2) hosts. Wrap-around only on full dimensions.
    for gen in ("v5e", "v6e"):
        for shape, wrap in (
            ("2x4", no_wrap),
            ("4x4", no_wrap),
            ("4x8", no_wrap),
            ("8x8", no_wrap),
            ("8x16", (False, True, False)),
            ("16x16", (True, True, False)),
        ):
            chips = _num_chips(shape)
            hosts = (2, 4, 1) if chips == 8 else (2, 2, 1)
            name = f"{gen}-{chips}"
            out[name] = TpuSlice(name, CHIPS[gen], f"{gen}:{shape}", "default", hosts, wrap)
    return out


def _num_chips(shape: str) -> int:
    """Number of chips in a topology shape like "2x2x4"."""
    n = 1
    for s in shape.split("x"):
        n *= int(s)
    return n


TPU_SLICES: dict[str, TpuSlice] = _slices()
_SLICE_ALIASES = {"v5litepod": "v5e", "trillium": "v6e", "v5lite": "v5e"}


def get_slice(name: str) -> TpuSlice:
    """Looks up a named slice; accepts Cloud's aliases (v5litepod-16 == v5e-16)."""
    gen, _, size = name.strip().lower().partition("-")
    key = f"{_SLICE_ALIASES.get(gen, gen)}-{size}"
    if key not in TPU_SLICES:
        raise ValueError(f"Unknown TPU slice {name!r}; known: {', '.join(TPU_SLICES)}")
    return TPU_SLICES[key]


def chip_for_device_kind(device_kind: str) -> Chip | None:
    """The table entry whose kind substring occurs in `device_kind` (e.g. 'TPU v5 lite'), or None."""
    for chip in CHIPS.values():
        if any(k.lower() in device_kind.lower() for k in chip.kinds):
            return chip
    return None


def peak_flops_per_device(device: Any) -> float:
    """Peak FLOP/s of one JAX device: bf16 spec for TPUs/GPUs, a measured f32 matmul share on CPU."""
    if device.platform == "cpu":
        return cpu_peak_flops() / max(1, _num_cpu_devices())
    chip = chip_for_device_kind(device.device_kind)
    if chip is None:
        raise ValueError(
            f"No peak FLOP/s known for device kind {device.device_kind!r} ({device.platform}); "
            f"add it to lmjax.hardware.CHIPS."
        )
    return chip.peak_bf16_flops


def hbm_bytes_per_device(device: Any) -> int | None:
    """HBM of the device's chip from the table, or None (CPU, unknown kinds)."""
    chip = chip_for_device_kind(device.device_kind)
    return chip.hbm_bytes if chip else None


def _num_cpu_devices() -> int:
    import jax

    return len(jax.local_devices(backend="cpu"))


def _cpu_key() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}|{os.cpu_count()}cpus"


def _cache_path() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "lmjax" / "cpu_peak.json"


def cpu_peak_flops() -> float:
    """Whole-machine CPU FLOP/s: env override, else the disk cache, else measured now.

    A measurement is cached only when the 1-minute load average says the machine was mostly idle, so
    a busy moment does not become a permanent (too low) peak and inflate every later MFU.
    """
    if os.environ.get(CPU_PEAK_ENV):
        return float(os.environ[CPU_PEAK_ENV])
    path, key = _cache_path(), _cpu_key()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key not in cache:
        busy = os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)
        flops = measure_cpu_matmul_flops()
        if busy:  # other work is running: use this figure now, but don't keep an underestimate
            return flops
        return record_cpu_peak(flops)
    return float(cache[key])


def record_cpu_peak(flops: float) -> float:
    """Keep the best CPU matmul FLOP/s seen on this machine (a peak is a maximum: a measurement
    taken while something else ran is too low, and a later, higher one replaces it)."""
    path, key = _cache_path(), _cpu_key()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    cache[key] = max(float(flops), float(cache.get(key, 0.0)))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)  # atomic: parallel test processes never see half a file
    except OSError:
        pass
    return cache[key]


def measure_cpu_matmul_flops(n: int = 2048, reps: int = 5) -> float:
    """Best-of-`reps` FLOP/s of a jitted n x n float32 matmul on CPU device 0.

    XLA's CPU matmul uses every core from one device, so this is the machine's figure; fake devices
    (`--xla_force_host_platform_device_count`) share it. The best rep is kept because the machine may
    be shared and a peak is an upper bound.
    """
    import jax
    import jax.numpy as jnp

    dev = jax.local_devices(backend="cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n**3 / best
