"""Meters: RAPL unwrapping on a fake sysfs tree, NVML counter and power sampling, the CPU-time estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from joule.energy.meter import (
    ESTIMATED,
    GENERIC_CPU,
    MEASURED,
    CpuPowerSpec,
    CpuTimeEnergyEstimate,
    FakeEnergyMeter,
    NvmlEnergyMeter,
    RaplEnergyMeter,
    lookup_cpu_power,
    select_energy_meter,
)


def make_zone(root: Path, name: str, label: str, energy_uj: int, max_range_uj: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
    return zone


def set_energy(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_and_dram_skips_core_and_unwraps_the_counter(tmp_path):
    package = make_zone(tmp_path, "intel-rapl:0", "package-0", 9_000_000, 10_000_000)
    make_zone(tmp_path, "intel-rapl:0:0", "core", 5_000_000, 10_000_000)  # inside the package figure
    dram = make_zone(tmp_path, "intel-rapl:0:1", "dram", 100, 1_000_000)
    meter = RaplEnergyMeter(tmp_path)
    assert meter.source == MEASURED and meter.name == "rapl:intel-rapl:0,intel-rapl:0:1"
    assert meter.read_joules() == 0.0
    set_energy(package, 9_500_000)  # +0.5 J
    set_energy(dram, 200_100)  # +0.2 J
    assert meter.read_joules() == pytest.approx(0.7)
    set_energy(package, 1_500_000)  # wrapped: +0.5 J to the top, +1.5 J after
    assert meter.read_joules() == pytest.approx(2.7)
    set_energy(package, 2_000_000)
    assert meter.read_joules() == pytest.approx(3.2)


def test_rapl_is_not_selected_where_unreadable_and_cpu_falls_back_to_the_estimate(tmp_path):
    assert RaplEnergyMeter.zone_paths(tmp_path / "missing") == []
    with pytest.raises(RuntimeError, match="no readable RAPL"):
        RaplEnergyMeter(tmp_path)
    meter = select_energy_meter("cpu", powercap_root=tmp_path)
    assert isinstance(meter, CpuTimeEnergyEstimate) and meter.source == ESTIMATED
    make_zone(tmp_path, "intel-rapl:0", "package-0", 1, 10)
    assert isinstance(select_energy_meter("cpu", powercap_root=tmp_path), RaplEnergyMeter)


class FakeNvml:
    """pynvml's surface: millijoule counter, or NotSupported and milliwatt power readings."""

    def __init__(self, millijoules: list[float] | None = None, milliwatts: list[float] | None = None):
        self.millijoules, self.milliwatts = millijoules, milliwatts

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if self.millijoules is None:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.millijoules.pop(0)

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.milliwatts.pop(0)


def test_nvml_counter_is_millijoules_since_the_meter_started():
    meter = NvmlEnergyMeter(1, nvml=FakeNvml(millijoules=[50_000.0, 52_500.0, 60_000.0]))
    assert meter.uses_counter and meter.name == "nvml:1" and meter.source == MEASURED
    assert meter.read_joules() == pytest.approx(2.5)
    assert meter.read_joules() == pytest.approx(10.0)


def test_nvml_without_the_counter_integrates_power_with_the_trapezoid_rule():
    times = iter([0.0, 2.0, 3.0])
    meter = NvmlEnergyMeter(0, nvml=FakeNvml(milliwatts=[100_000.0, 200_000.0, 200_000.0]), clock=lambda: next(times))
    assert not meter.uses_counter and meter.name.endswith("power-sampling")
    assert meter.read_joules() == pytest.approx(300.0)  # (100 + 200) / 2 W x 2 s
    assert meter.read_joules() == pytest.approx(500.0)  # + 200 W x 1 s


def test_cpu_estimate_is_cpu_seconds_times_dynamic_watts_plus_idle_share():
    clocks = {"cpu": 10.0, "wall": 100.0}
    meter = CpuTimeEnergyEstimate(spec=CpuPowerSpec(100.0, 10, "test"), num_cores=2, idle_share=0.3,
                                  cpu_clock=lambda: clocks["cpu"], wall_clock=lambda: clocks["wall"])
    assert meter.read_joules() == 0.0
    clocks["cpu"] += 4.0  # 4 core-seconds busy at 7 W dynamic
    clocks["wall"] += 2.0  # 2 s at 2 cores x 3 W idle
    assert meter.read_joules() == pytest.approx(4.0 * 7.0 + 2.0 * 6.0)


def test_cpu_estimate_grows_with_real_cpu_work():
    meter = CpuTimeEnergyEstimate(wall_clock=lambda: 0.0)  # count the busy part only
    before = meter.read_joules()
    total = 0
    for value in range(3_000_000):
        total += value * value
    after = meter.read_joules()
    assert total > 0
    assert after > before
    assert after - before >= 0.01 * meter.dynamic_watts_per_core  # at least 10 ms of CPU time


def test_cpu_power_table_lookup_and_fallback():
    assert lookup_cpu_power("AMD EPYC 9654 96-Core Processor").watts_per_core == pytest.approx(3.75)
    assert lookup_cpu_power("Intel(R) Xeon(R) Platinum 8480+").cores == 56
    assert lookup_cpu_power("Some Unknown CPU") is GENERIC_CPU
    with pytest.raises(ValueError, match="idle_share"):
        CpuTimeEnergyEstimate(idle_share=1.5)


def test_cuda_without_nvml_falls_back_to_an_estimate():
    meter = select_energy_meter("cuda:0")  # pynvml is absent (or has no GPU) on CPU machines
    assert meter.source in (MEASURED, ESTIMATED)
    if not isinstance(meter, NvmlEnergyMeter):
        assert isinstance(meter, CpuTimeEnergyEstimate)


def test_fake_meter_only_goes_up():
    meter = FakeEnergyMeter()
    meter.add(2.0)
    assert meter.read_joules() == 2.0 and meter.num_reads == 1
    with pytest.raises(ValueError, match="only goes up"):
        meter.add(-1.0)
