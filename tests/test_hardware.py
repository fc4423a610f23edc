"""The peak/HBM table, the named TPU slices, and where a CPU peak comes from."""

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


def test_accelerator_peaks_say_they_come_from_the_table():
    assert hardware.peak_flops_and_source(_device("tpu", "TPU v5 lite")) == (197e12, "table")


TABLE_CPU = hardware.CPUS[0]


def _cpuinfo(name: str, family: int, model: int) -> str:
    """Two processors' blocks of /proc/cpuinfo, as Linux lays them out."""
    block = "processor\t: {}\nvendor_id\t: GenuineIntel\ncpu family\t: %d\nmodel\t\t: %d\nmodel name\t: %s\n"
    block %= (family, model, name)
    return block.format(0) + "\n" + block.format(1) + "\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Controls what hardware sees: the CPU model, its usable cores, the load and the measurement.

    `cpu.measured` lists each measurement taken; `cpu.next_flops` is what the next one returns.
    """
    monkeypatch.delenv(hardware.CPU_PEAK_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    state = types.SimpleNamespace(measured=[], next_flops=1.2e11, cores=1, load=0.0)
    state.cache = tmp_path / "lmjax" / "cpu_peak.json"

    def measure():
        state.measured.append(state.next_flops)
        return state.next_flops

    state.set_model = lambda name, family, model: monkeypatch.setattr(
        hardware, "_cpuinfo_text", lambda: _cpuinfo(name, family, model)
    )
    state.set_model("Intel(R) Xeon(R) Processor", 6, 85)  # a model missing from the table
    monkeypatch.setattr(hardware, "measure_cpu_matmul_flops", measure)
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(state.cores)))
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (state.load,) * 3)
    return state


def test_cpu_key_tells_apart_models_that_share_a_generic_name(cpu):
    cpu.set_model("Intel(R) Xeon(R) Processor", 6, 207)
    key_207 = hardware.cpu_key()
    cpu.set_model("Intel(R) Xeon(R) Processor", 6, 143)
    assert key_207 == "Intel(R) Xeon(R) Processor (family 6, model 207)"
    assert hardware.cpu_key() == "Intel(R) Xeon(R) Processor (family 6, model 143)"


def test_a_cpu_in_the_table_is_never_measured(cpu, monkeypatch):
    cpu.set_model(TABLE_CPU.model_name, TABLE_CPU.family, TABLE_CPU.model)
    monkeypatch.setattr(hardware, "measure_cpu_matmul_flops", lambda: pytest.fail("measured a CPU in the table"))
    assert hardware.cpu_peak() == (TABLE_CPU.peak_f32_flops_per_core, "table")
    assert not cpu.cache.exists()


def test_a_generic_cpu_name_alone_does_not_match_the_table(cpu):
    cpu.set_model(TABLE_CPU.model_name, TABLE_CPU.family, TABLE_CPU.model + 1)
    assert hardware.cpu_peak() == (1.2e11, "measured now")


def test_table_peak_scales_with_the_cores_this_process_may_use(cpu):
    cpu.set_model(TABLE_CPU.model_name, TABLE_CPU.family, TABLE_CPU.model)
    peaks = {}
    for cores in (1, 2, 4):
        cpu.cores = cores
        peaks[cores] = hardware.cpu_peak()[0]
    assert peaks == {n: n * TABLE_CPU.peak_f32_flops_per_core for n in (1, 2, 4)}


def test_fake_cpu_devices_share_the_process_peak(cpu, monkeypatch):
    cpu.set_model(TABLE_CPU.model_name, TABLE_CPU.family, TABLE_CPU.model)
    cpu.cores = 2
    monkeypatch.setattr(hardware, "_num_cpu_devices", lambda: 8)  # --xla_force_host_platform_device_count=8
    per_device = 2 * TABLE_CPU.peak_f32_flops_per_core / 8
    assert hardware.peak_flops_and_source(_device("cpu", "cpu")) == (pytest.approx(per_device), "table")
    assert hardware.peak_flops_per_device(_device("cpu", "cpu")) == pytest.approx(per_device)


def test_an_unknown_cpu_is_measured_once_and_then_read_from_the_cache(cpu):
    assert hardware.cpu_peak() == (1.2e11, "measured now")
    cpu.load = 64.0  # a busy machine, and one where a new measurement would come out higher
    cpu.next_flops = 2e11
    assert hardware.cpu_peak() == (1.2e11, "cache")
    assert cpu.measured == [1.2e11]


def test_a_measurement_taken_on_a_busy_machine_is_kept_with_a_warning(cpu):
    cpu.load = 64.0
    with pytest.warns(UserWarning, match="--measure_cpu_peak"):
        assert hardware.cpu_peak() == (1.2e11, "measured now")
    cpu.load = 0.0
    cpu.next_flops = 2e11
    assert hardware.cpu_peak() == (1.2e11, "cache")
    assert len(cpu.measured) == 1


def test_the_cache_holds_a_per_core_figure_that_scales_with_usable_cores(cpu):
    cpu.cores, cpu.next_flops = 2, 3e11
    assert hardware.cpu_peak() == (3e11, "measured now")
    cpu.cores = 1  # e.g. the next run is started with `taskset -c 0`
    assert hardware.cpu_peak() == (1.5e11, "cache")


def test_cpu_models_do_not_share_a_cached_peak(cpu):
    assert hardware.cpu_peak() == (1.2e11, "measured now")
    cpu.set_model("Intel(R) Xeon(R) Processor", 6, 106)
    cpu.next_flops = 0.9e11
    assert hardware.cpu_peak() == (0.9e11, "measured now")
    assert set(json.loads(cpu.cache.read_text())) == {
        "Intel(R) Xeon(R) Processor (family 6, model 85)",
        "Intel(R) Xeon(R) Processor (family 6, model 106)",
    }


def test_an_explicit_remeasurement_replaces_the_cached_peak(cpu):
    hardware.cpu_peak()
    cpu.next_flops = 0.8e11  # lower: an explicit measurement is taken as is, not as a maximum
    assert hardware.measure_cpu_peak() == 0.8e11
    assert hardware.cpu_peak() == (0.8e11, "cache")


def test_the_env_override_wins_over_table_and_cache(cpu, monkeypatch):
    monkeypatch.setenv(hardware.CPU_PEAK_ENV, "5e10")
    cpu.set_model(TABLE_CPU.model_name, TABLE_CPU.family, TABLE_CPU.model)
    assert hardware.cpu_peak() == (5e10, "env")
    cpu.set_model("Intel(R) Xeon(R) Processor", 6, 85)
    assert hardware.cpu_peak() == (5e10, "env")
    assert cpu.measured == []


def test_cpu_peak_env_override_is_shared_by_the_cpu_devices(monkeypatch):
    monkeypatch.setenv(hardware.CPU_PEAK_ENV, "8e10")
    cpus = jax.local_devices(backend="cpu")
    assert hardware.peak_flops_and_source(cpus[0]) == (pytest.approx(8e10 / len(cpus)), "env")


def test_cpu_matmul_measurement_keeps_the_fastest_rep(monkeypatch):
    # A fake clock (hardware's own `time`, so JAX's timing is untouched): reps of 0.3 s, 0.1 s, 0.2 s.
    ticks = iter([0.0, 0.3, 1.0, 1.1, 2.0, 2.2])
    monkeypatch.setattr(hardware, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert hardware.measure_cpu_matmul_flops(n=64, reps=3) == pytest.approx(2 * 64**3 / 0.1)


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]')")
def test_every_named_slice_is_a_topology_libtpu_accepts(monkeypatch):
    from jax.experimental import topologies

    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: no chip to guard

    for s in hardware.TPU_SLICES.values():
        devices = topologies.get_topology_desc(**s.topology_kwargs()).devices
        assert len(devices) == s.num_devices, s.name
        assert len({d.process_index for d in devices}) == s.num_hosts, s.name
        assert hardware.chip_for_device_kind(devices[0].device_kind) is s.chip, s.name
