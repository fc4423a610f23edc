"""The peak/HBM table, the named TPU slices, and the cached CPU peak."""

import importlib.util
import json
import types

import jax
import pytest

from lmjax import hardware

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _device(platform: str, kind: str):
    return types.SimpleNamespace(platform=platform, device_kind=kind)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5", 459e12),
        ("TPU v6 lite", 918e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA H100 80GB HBM3", 989.5e12),
        ("NVIDIA H100 PCIe", 756.5e12),
        ("NVIDIA H200", 989.5e12),
    ],
)
def test_device_kinds_map_to_their_chip_peak(kind, peak):
    assert hardware.peak_flops_per_device(_device("tpu", kind)) == peak


def test_unknown_accelerator_is_an_error_naming_the_kind():
    with pytest.raises(ValueError, match="TPU v99"):
        hardware.peak_flops_per_device(_device("tpu", "TPU v99"))


def test_slice_names_count_tensorcores_on_v4_v5p_and_chips_on_v5e_v6e():
    assert hardware.get_slice("v4-8").num_chips == 4
    assert hardware.get_slice("v5p-128").topology == "v5p:4x4x4"
    assert hardware.get_slice("v5p-128").wrap == (True, True, True)
    assert hardware.get_slice("v5e-16").num_chips == 16
    assert hardware.get_slice("v5litepod-16") == hardware.get_slice("v5e-16")
    assert hardware.get_slice("v5e-16").num_hosts == 4
    assert hardware.get_slice("v6e-8").num_hosts == 1
    assert hardware.get_slice("v6e-256").chip.hbm_bytes == 32 * hardware.GiB
    with pytest.raises(ValueError, match="v5e-12"):
        hardware.get_slice("v5e-12")


def test_cpu_peak_env_override_is_shared_by_the_cpu_devices(monkeypatch):
    monkeypatch.setenv(hardware.CPU_PEAK_ENV, "8e10")
    cpus = jax.local_devices(backend="cpu")
    assert hardware.peak_flops_per_device(cpus[0]) == pytest.approx(8e10 / len(cpus))


def test_cpu_peak_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(hardware.CPU_PEAK_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    calls = []
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(hardware, "measure_cpu_matmul_flops", lambda: calls.append(1) or 1.5e11)
    assert hardware.cpu_peak_flops() == 1.5e11
    assert hardware.cpu_peak_flops() == 1.5e11
    assert len(calls) == 1
    cached = json.loads((tmp_path / "lmjax" / "cpu_peak.json").read_text())
    assert list(cached.values()) == [1.5e11]


def test_cpu_peak_measured_on_a_busy_machine_is_not_cached(monkeypatch, tmp_path):
    monkeypatch.delenv(hardware.CPU_PEAK_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    monkeypatch.setattr(hardware, "measure_cpu_matmul_flops", lambda: 5e10)
    assert hardware.cpu_peak_flops() == 5e10
    assert not (tmp_path / "lmjax" / "cpu_peak.json").exists()


def test_a_higher_cpu_peak_replaces_the_cached_one_and_a_lower_does_not(monkeypatch, tmp_path):
    monkeypatch.delenv(hardware.CPU_PEAK_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hardware.record_cpu_peak(9e10) == 9e10
    assert hardware.record_cpu_peak(1.5e11) == 1.5e11
    assert hardware.record_cpu_peak(6e10) == 1.5e11
    assert hardware.cpu_peak_flops() == 1.5e11


def test_cpu_matmul_measurement_is_plausible():
    flops = hardware.measure_cpu_matmul_flops(n=256, reps=2)
    assert 1e8 < flops < 1e14


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]')")
def test_every_named_slice_is_a_topology_libtpu_accepts(monkeypatch):
    from jax.experimental import topologies

    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard

    for s in hardware.TPU_SLICES.values():
        devices = topologies.get_topology_desc(**s.topology_kwargs()).devices
        assert len(devices) == s.num_devices, s.name
        assert len({d.process_index for d in devices}) == s.num_hosts, s.name
        assert hardware.chip_for_device_kind(devices[0].device_kind) is s.chip, s.name
