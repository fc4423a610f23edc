"""What the hardware can do: peak FLOP/s and HBM per chip, the named TPU slices, and CPU peaks.

MFU divides achieved model FLOP/s by these peaks, and `lmjax.aot` compiles for the slices listed here,
so both read one table. Peaks are the dense (no sparsity) bf16 figures from the vendors' spec sheets.

TPU naming trap: in `v4-N` and `v5p-N` the N counts TensorCores (two per chip, fused into one JAX
device by "megacore"), so v4-8 is 4 chips and 4 JAX devices; in `v5e-N` / `v6e-N` (one TensorCore per
chip) N counts chips.

On CPU there is no spec sheet, and a peak measured in every process moves with whatever else the
machine runs, so MFU figures of two runs would not be comparable. The CPU peak is therefore a fixed
number: an f32 matmul FLOP/s per core from the `CPUS` table, times the cores this process may run on
(`taskset -c 0` gives a one-core peak). A CPU model missing from the table is measured once and
cached on disk (`~/.cache/lmjax/cpu_peak.json`, keyed by CPU model); later runs read that figure and
never replace it on their own: `python -m lmjax.hardware --measure_cpu_peak` re-measures on purpose.
`LMJAX_CPU_PEAK_FLOPS` (FLOP/s for the whole process) overrides all of it, e.g. in tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import platform
import time
import warnings
from collections.abc import Iterator
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
    """Peak FLOP/s of one JAX device: bf16 spec for TPUs/GPUs, a share of the f32 CPU peak on CPU."""
    return peak_flops_and_source(device)[0]


def peak_flops_and_source(device: Any) -> tuple[float, str]:
    """(peak FLOP/s of one JAX device, where that figure came from), so a report can say what its MFU
    is relative to. The source is "table" (a spec sheet in `CHIPS` or a CPU in `CPUS`), "cache" (this
    CPU model's earlier measurement), "measured now" (no figure yet: measured and cached) or "env".

    Fake CPU devices (`--xla_force_host_platform_device_count`) share the process's cores, so each
    gets an equal share of the process's peak.
    """
    if device.platform == "cpu":
        flops, source = cpu_peak()
        return flops / max(1, _num_cpu_devices()), source
    chip = chip_for_device_kind(device.device_kind)
    if chip is None:
        raise ValueError(
            f"No peak FLOP/s known for device kind {device.device_kind!r} ({device.platform}); "
            f"add it to lmjax.hardware.CHIPS."
        )
    return chip.peak_bf16_flops, "table"


def _num_cpu_devices() -> int:
    import jax

    return len(jax.local_devices(backend="cpu"))


@dataclasses.dataclass(frozen=True)
class CpuModel:
    """A CPU model as /proc/cpuinfo names it. Cloud VMs often show a generic model name ("Intel(R)
    Xeon(R) Processor") for different generations, so the family and model numbers are part of the key."""

    model_name: str
    family: int
    model: int
    peak_f32_flops_per_core: float  # jitted f32 matmul FLOP/s on one core (one vCPU)

    @property
    def key(self) -> str:
        return _cpu_key(self.model_name, self.family, self.model)


CPUS: tuple[CpuModel, ...] = (
    # Family 6, model 207 (0xCF: 5th-generation Xeon Scalable, AVX-512 and AMX) behind a generic VM
    # name: the 2-vCPU machines lmjax is developed and tested on. A jitted f32 2048x2048 matmul
    # (jax 0.10.2, no XLA_FLAGS) in processes pinned to one vCPU with `taskset -c 0`; each process's
    # fastest of 40 reps, the median over the processes that other work on this shared machine did
    # not slow down (those form a separate cluster, about a third slower). Processes pinned to both
    # vCPUs (`taskset -c 0,1`) reach twice this figure.
    CpuModel("Intel(R) Xeon(R) Processor", 6, 207, 128e9),
)


def _cpu_key(model_name: str, family: int | None, model: int | None) -> str:
    if family is None or model is None:
        return model_name
    return f"{model_name} (family {family}, model {model})"


def _cpuinfo_text() -> str:
    try:
        return pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux
        return ""


def cpu_key() -> str:
    """This machine's CPU model: /proc/cpuinfo's "model name", "cpu family" and "model" of the first
    processor, or the platform's processor name where there is no /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in _cpuinfo_text().splitlines():
        if not line.strip():
            break  # the first processor's block ends here; the others repeat it
        name, _, value = line.partition(":")
        fields.setdefault(name.strip(), value.strip())
    model_name = fields.get("model name") or platform.processor() or platform.machine()
    family, model = fields.get("cpu family"), fields.get("model")
    return _cpu_key(
        model_name,
        int(family) if family and family.isdigit() else None,
        int(model) if model and model.isdigit() else None,
    )


def usable_cores() -> int:
    """Cores this process may run on (`taskset`, cgroup cpusets), which can be fewer than the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def cpu_peak() -> tuple[float, str]:
    """(peak FLOP/s of the cores this process may use, source): `LMJAX_CPU_PEAK_FLOPS` if set, else
    the `CPUS` table, else this CPU model's cached measurement, else a measurement taken now and cached.

    A cached figure is never replaced by a later run, whatever that run could measure: a peak that
    moves between runs makes their MFU figures incomparable. `measure_cpu_peak()` replaces it on purpose.
    """
    if os.environ.get(CPU_PEAK_ENV):
        return float(os.environ[CPU_PEAK_ENV]), "env"
    key, cores = cpu_key(), usable_cores()
    for entry in CPUS:
        if entry.key == key:
            return entry.peak_f32_flops_per_core * cores, "table"
    with _cache_lock():
        cached = _read_cache().get(key)
        if cached is not None:
            return float(cached["flops_per_core"]) * cores, "cache"
        per_core = _measure_and_cache(key)
    return per_core * cores, "measured now"


def measure_cpu_peak() -> float:
    """Measures this CPU's per-core matmul FLOP/s now and caches it as its model's peak, replacing any
    earlier figure (e.g. one measured while the machine was busy). Returns FLOP/s per core.

    A CPU listed in `CPUS` keeps the table's figure: the cache is read only for models missing from it.
    """
    with _cache_lock():
        return _measure_and_cache(cpu_key())


def _measure_and_cache(key: str) -> float:
    cores = usable_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    per_core = measure_cpu_matmul_flops() / cores
    if load > 0.5 * (os.cpu_count() or 1):
        warnings.warn(
            f"The CPU peak of {key!r} was measured while the machine was busy (1-minute load average "
            f"{load:.1f}) and is now cached as its peak, so MFU will read high. On an idle machine, "
            f"re-measure with: python -m lmjax.hardware --measure_cpu_peak",
            stacklevel=3,
        )
    cache = _read_cache()
    cache[key] = {
        "flops_per_core": per_core,
        "cores_measured": cores,
        "load_average": round(load, 2),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)  # atomic: a reader never sees half a file
    except OSError as e:
        warnings.warn(
            f"Could not cache the CPU peak in {path} ({e}): every process will measure it again, so "
            f"MFU figures of different runs are not comparable. Set {CPU_PEAK_ENV} instead.",
            stacklevel=3,
        )
    return per_core


def _cache_path() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "lmjax" / "cpu_peak.json"


def _read_cache() -> dict[str, Any]:
    try:
        return json.loads(_cache_path().read_text())
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    """Held while a process reads, measures and writes the cache, so runs started together (a local
    sweep) measure once: the others wait, then read the first one's figure."""
    path = _cache_path().with_suffix(".lock")
    lock_file = None
    try:
        import fcntl

        path.parent.mkdir(parents=True, exist_ok=True)
        lock_file = open(path, "w")
    except (ImportError, OSError):  # no fcntl (Windows) or no writable cache: go without the lock
        pass
    if lock_file is None:
        yield
        return
    with lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        yield


def measure_cpu_matmul_flops(n: int = 2048, reps: int = 10) -> float:
    """Best-of-`reps` FLOP/s of a jitted n x n float32 matmul on CPU device 0.

    XLA's CPU matmul spreads over every core the process may run on, so this is the process's figure;
    fake devices share it. The best rep is kept because a peak is an upper bound and other work on a
    shared machine only ever slows a rep down.
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


def _main(argv: list[str]) -> None:
    del argv
    if _MEASURE.value:
        per_core = measure_cpu_peak()
        print(f"measured {per_core / 1e9:.1f} GFLOP/s per core on {usable_cores()} cores; cached in {_cache_path()}")
    key = cpu_key()
    flops, source = cpu_peak()
    print(f"{key}: {usable_cores()} usable cores, peak {flops / 1e9:.1f} GFLOP/s (source: {source})")
    if source == "table" and _MEASURE.value:
        print("This CPU is in lmjax.hardware.CPUS: MFU uses the table's figure, not the cached measurement.")


if __name__ == "__main__":
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CPU peak is measured on the CPU backend
    from absl import app, flags

    _MEASURE = flags.DEFINE_bool(
        "measure_cpu_peak", False, "Re-measure this CPU's matmul peak and cache it, replacing the cached one."
    )
    app.run(_main)
