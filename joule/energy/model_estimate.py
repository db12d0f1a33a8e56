"""Energy estimated by the performance model, where no counter can be read (CPUs without RAPL, GPUs without NVML).

The device draws its profile's idle power all the time, and above it each step's FLOPs and bytes at the profile's
per-FLOP and per-byte energies (``joule.perf.step_model``), capped at its maximum power over the step's measured
wall time. It replaces the estimate from the process's CPU time wherever a profile exists: a calibrated one for the
device (``joule/perf/profiles``), else the catalog's defaults for its kind; the meter's name says which.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from joule.energy.meter import ESTIMATED


@dataclass
class StepModelEnergyEstimate:
    """A joule counter driven by the steps the ledger shows it (``observe_step``) and the wall clock."""

    step_model: object  # joule.perf.step_model.StepModel (not imported here: the perf package loads lazily)
    wall_clock: Callable[[], float] = time.monotonic
    name: str = "perf-model-estimate"
    source: str = ESTIMATED
    _busy_joules: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self._wall_start = self.wall_clock()
        profile = self.step_model.profile
        kind = "calibrated profile" if profile.has_measured_gemms else "catalog defaults"
        self.name = f"perf-model-estimate ({profile.hardware}, {profile.dtype}, {kind})"

    @property
    def idle_watts(self) -> float:
        return self.step_model.profile.idle_watts

    def observe_step(self, plan, seconds: float) -> None:
        """A step the engine ran: its work above idle power (the ledger calls this before reading the counter)."""
        from joule.perf.batch_shape import BatchShape

        self._busy_joules += self.step_model.busy_joules(BatchShape.from_plan(plan), max(0.0, seconds))

    def read_joules(self) -> float:
        return self.idle_watts * max(0.0, self.wall_clock() - self._wall_start) + self._busy_joules


def model_energy_estimate(model_config, device_type: str, dtype: str) -> StepModelEnergyEstimate:
    """The performance model's estimate for this machine: its catalog kind (``detect_hardware``), the shipped
    calibrated profile for that kind and dtype if there is one, else the catalog's defaults."""
    from joule.perf.measure import detect_cpu_hardware, detect_hardware
    from joule.perf.profile import resolve_profile
    from joule.perf.step_model import StepModel

    hardware = detect_hardware() if device_type == "cuda" else detect_cpu_hardware()
    return StepModelEnergyEstimate(StepModel(model_config, resolve_profile(hardware, dtype)))
