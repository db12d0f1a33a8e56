"""Energy meters: monotonic joule counters from hardware where it can be read, an estimate where not.

Every meter says where its figures come from (``source``: ``measured`` or ``estimated``) so that
no number Joule reports passes an estimate off as a measurement. Meters are read at step
boundaries by the ledger (``attribution.py``); they never need a background thread.
"""

from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, runtime_checkable

from joule.logger import get_logger

logger = get_logger()

MEASURED = "measured"
ESTIMATED = "estimated"


@runtime_checkable
class EnergyMeter(Protocol):
    """A monotonic counter of joules since the meter was created."""

    name: str
    source: str  # MEASURED or ESTIMATED

    def read_joules(self) -> float: ...


# -- NVML (NVIDIA GPUs) --------------------------------------------------------------------------
class NvmlEnergyMeter:
    """The GPU's total-energy counter (Volta and newer), or integrated power draw where it is missing.

    ``nvmlDeviceGetTotalEnergyConsumption`` counts millijoules since the driver loaded; older GPUs
    raise NotSupported, and then power (milliwatts) is sampled at each read and integrated with the
    trapezoid rule, which is as fine-grained as the ledger's reads (one per engine step).
    ``nvml`` may be injected (tests); by default ``pynvml`` (nvidia-ml-py) is imported lazily.
    """

    source = MEASURED

    def __init__(self, device_index: int = 0, nvml=None, clock: Callable[[], float] = time.monotonic):
        self._nvml = nvml if nvml is not None else importlib.import_module("pynvml")
        self._nvml.nvmlInit()
        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(device_index)
        self._clock = clock
        self.device_index = device_index
        try:
            self._start_millijoules = float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            self.uses_counter = True
        except Exception as error:  # pynvml.NVMLError_NotSupported and friends
            logger.info("NVML energy counter unavailable on GPU %d (%s): sampling power", device_index, error)
            self.uses_counter = False
            self._integrated_joules = 0.0
            self._last_time = clock()
            self._last_watts = self._read_watts()
        self.name = f"nvml:{device_index}" + ("" if self.uses_counter else ":power-sampling")

    def _read_watts(self) -> float:
        return float(self._nvml.nvmlDeviceGetPowerUsage(self._handle)) / 1000.0

    def read_joules(self) -> float:
        if self.uses_counter:
            millijoules = float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle))
            return (millijoules - self._start_millijoules) / 1000.0
        now, watts = self._clock(), self._read_watts()
        self._integrated_joules += 0.5 * (watts + self._last_watts) * max(0.0, now - self._last_time)
        self._last_time, self._last_watts = now, watts
        return self._integrated_joules


# -- Intel RAPL via powercap ---------------------------------------------------------------------
DEFAULT_POWERCAP_ROOT = Path("/sys/class/powercap")


@dataclass
class _RaplZone:
    """One RAPL domain's wrapping microjoule counter, unwrapped into a running total."""

    path: Path
    max_range_uj: int
    last_uj: int
    total_uj: int = 0

    def read(self) -> int:
        raw = int((self.path / "energy_uj").read_text())
        delta = raw - self.last_uj
        if delta < 0:  # the counter wrapped at max_energy_range_uj
            delta += self.max_range_uj
        self.last_uj = raw
        self.total_uj += delta
        return self.total_uj


class RaplEnergyMeter:
    """Package (and DRAM) energy from Intel RAPL counters under ``/sys/class/powercap``.

    Top-level ``intel-rapl:N`` zones are the CPU packages; their ``core``/``uncore`` subzones are
    already inside the package figure and are skipped, while ``dram`` subzones are not and are added.
    Counters wrap at ``max_energy_range_uj``; reads must come more often than one wrap (minutes).
    The files are root-only on most distributions, so this meter is used only where readable.
    """

    source = MEASURED

    def __init__(self, root: Path = DEFAULT_POWERCAP_ROOT):
        zone_paths = self.zone_paths(Path(root))
        if not zone_paths:
            raise RuntimeError(f"no readable RAPL energy counters under {root}")
        self._zones = [
            _RaplZone(path, int((path / "max_energy_range_uj").read_text()), int((path / "energy_uj").read_text()))
            for path in zone_paths
        ]
        self.name = "rapl:" + ",".join(path.name for path in zone_paths)

    @staticmethod
    def zone_paths(root: Path) -> list[Path]:
        """Package zones plus DRAM subzones whose counters this process can read."""
        if not root.is_dir():
            return []
        chosen = []
        for path in sorted(root.glob("intel-rapl:*")):
            is_package = path.name.count(":") == 1
            is_dram = not is_package and _read_text(path / "name") == "dram"
            if (is_package or is_dram) and _readable(path / "energy_uj") and _readable(path / "max_energy_range_uj"):
                chosen.append(path)
        return chosen

    def read_joules(self) -> float:
        return sum(zone.read() for zone in self._zones) / 1e6


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _readable(path: Path) -> bool:
    text = _read_text(path)
    return text is not None and text.isdigit()


# -- estimate from CPU time ----------------------------------------------------------------------
@dataclass(frozen=True)
class CpuPowerSpec:
    """A CPU's rated package power and core count; watts per core follow from them."""

    tdp_watts: float
    cores: int
    source: str

    @property
    def watts_per_core(self) -> float:
        return self.tdp_watts / self.cores


# Vendor TDP and core counts (matched as substrings of /proc/cpuinfo's "model name").
CPU_POWER_TABLE: dict[str, CpuPowerSpec] = {
    "EPYC 9654": CpuPowerSpec(360, 96, "AMD product page, EPYC 9654: 360 W default TDP, 96 cores"),
    "EPYC 9554": CpuPowerSpec(360, 64, "AMD product page, EPYC 9554: 360 W default TDP, 64 cores"),
    "EPYC 7763": CpuPowerSpec(280, 64, "AMD product page, EPYC 7763: 280 W default TDP, 64 cores"),
    "Platinum 8480": CpuPowerSpec(350, 56, "Intel ARK, Xeon Platinum 8480+: 350 W TDP, 56 cores"),
    "Platinum 8380": CpuPowerSpec(270, 40, "Intel ARK, Xeon Platinum 8380: 270 W TDP, 40 cores"),
    "Platinum 8375C": CpuPowerSpec(300, 32, "AWS m6i/c6i hosts: Xeon Platinum 8375C, 300 W TDP, 32 cores"),
    "Platinum 8259CL": CpuPowerSpec(210, 24, "AWS m5/c5 hosts: Xeon Platinum 8259CL, 210 W TDP, 24 cores"),
    "Gold 6338": CpuPowerSpec(205, 32, "Intel ARK, Xeon Gold 6338: 205 W TDP, 32 cores"),
    "Core(TM) i9-13900K": CpuPowerSpec(125, 24, "Intel ARK, Core i9-13900K: 125 W base power, 24 cores"),
}
# Unknown CPUs: a mid-range server part, about 5 W per core at TDP (e.g. 270 W / 40 cores = 6.75,
# 360 W / 96 = 3.75 above).
GENERIC_CPU = CpuPowerSpec(160, 32, "generic server CPU: 5 W per core at TDP (midpoint of the table)")
# Share of TDP drawn with the cores idle (uncore, memory controller, leakage). SPECpower_ssj2008
# results for recent two-socket servers show active-idle at roughly 20-35% of full-load power;
# 0.3 is taken as a round figure within that range.
IDLE_SHARE_OF_TDP = 0.3


def cpu_model_name(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    for line in (_read_text(cpuinfo) or "").splitlines():
        if line.lower().startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def _usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def lookup_cpu_power(model_name: str) -> CpuPowerSpec:
    for key, spec in CPU_POWER_TABLE.items():
        if key.lower() in model_name.lower():
            return spec
    return GENERIC_CPU


@dataclass
class CpuTimeEnergyEstimate:
    """Joules from this process's CPU time, where no counter can be read.

    joules = cpu_seconds x dynamic watts per core + wall_seconds x idle watts per core x cores we may
    use, with per-core watts = TDP / cores of the CPU (``CPU_POWER_TABLE``) split into an idle share
    (``IDLE_SHARE_OF_TDP``) and the rest, drawn only while a core is busy. Process CPU time covers
    every thread, so torch's intra-op pool counts. The engine uses it only where the performance model's
    estimate cannot be made (``joule.energy.model_estimate``).
    """

    spec: CpuPowerSpec = field(default_factory=lambda: lookup_cpu_power(cpu_model_name()))
    num_cores: int = field(default_factory=lambda: _usable_cores())
    idle_share: float = IDLE_SHARE_OF_TDP
    cpu_clock: Callable[[], float] = time.process_time
    wall_clock: Callable[[], float] = time.monotonic
    name: str = "cpu-time-estimate"
    source: str = ESTIMATED

    def __post_init__(self) -> None:
        if not 0.0 <= self.idle_share < 1.0:
            raise ValueError(f"idle_share must be in [0, 1), got {self.idle_share}.")
        if self.num_cores < 1:
            raise ValueError(f"num_cores must be at least 1, got {self.num_cores}.")
        self._cpu_start, self._wall_start = self.cpu_clock(), self.wall_clock()

    @property
    def dynamic_watts_per_core(self) -> float:
        return (1.0 - self.idle_share) * self.spec.watts_per_core

    @property
    def idle_watts(self) -> float:
        return self.idle_share * self.spec.watts_per_core * self.num_cores

    def read_joules(self) -> float:
        cpu_seconds = max(0.0, self.cpu_clock() - self._cpu_start)
        wall_seconds = max(0.0, self.wall_clock() - self._wall_start)
        return cpu_seconds * self.dynamic_watts_per_core + wall_seconds * self.idle_watts


# -- tests ---------------------------------------------------------------------------------------
@dataclass
class FakeEnergyMeter:
    """A scripted counter for tests: advance it by hand (``add``) or by a callback at each read."""

    joules: float = 0.0
    on_read: Callable[["FakeEnergyMeter"], None] | None = None
    name: str = "fake"
    source: str = MEASURED
    num_reads: int = 0

    def add(self, joules: float) -> None:
        if joules < 0:
            raise ValueError(f"an energy counter only goes up; cannot add {joules} J.")
        self.joules += joules

    def read_joules(self) -> float:
        if self.on_read is not None:
            self.on_read(self)
        self.num_reads += 1
        return self.joules


# -- selection -----------------------------------------------------------------------------------
def select_energy_meter(device="cpu", powercap_root: Path = DEFAULT_POWERCAP_ROOT, model_config=None,
                        dtype: str | None = None) -> EnergyMeter:
    """The best meter for ``device`` (a torch.device or a string): measured if possible, else estimated: by the
    performance model for ``model_config`` in ``dtype`` when given (``joule.energy.model_estimate``), else from
    the process's CPU time."""
    device_type = getattr(device, "type", None) or str(device).split(":")[0]
    if device_type == "cuda":
        index = getattr(device, "index", None)
        if index is None and ":" in str(device):
            index = int(str(device).split(":")[1])
        try:
            from joule.energy.sampled import BackgroundSampledMeter

            # NVML reads cost milliseconds: sample off the step path.
            meter: EnergyMeter = BackgroundSampledMeter(NvmlEnergyMeter(index or 0))
            logger.info("energy: measured by %s", meter.name)
            return meter
        except Exception as error:  # no pynvml, no driver, no permission
            logger.warning("energy: NVML unavailable (%s); estimating instead", error)
    elif RaplEnergyMeter.zone_paths(Path(powercap_root)):
        meter = RaplEnergyMeter(powercap_root)
        logger.info("energy: measured by %s", meter.name)
        return meter
    if model_config is not None:
        from joule.energy.model_estimate import model_energy_estimate

        try:
            meter = model_energy_estimate(model_config, device_type, dtype)
            logger.info("energy: estimated by the performance model (%s)", meter.name)
            return meter
        except (ValueError, OSError) as error:  # a GPU the catalog lacks; an unreadable profile file
            logger.warning("energy: no performance model for this device (%s); estimating from CPU time", error)
    meter = CpuTimeEnergyEstimate()
    logger.info("energy: estimated from CPU time (%s)", meter.spec.source)
    return meter
