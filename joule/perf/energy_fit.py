"""Energy calibration: idle power and the per-FLOP and per-byte energies, fitted to a hardware meter.

The step model charges a step ``idle_watts x time + energy_per_flop x FLOPs + energy_per_byte x bytes`` (capped at
``max_watts x time``). Uncalibrated, the three come from the catalog's board power (``DeviceProfile.from_hardware``).
Where the engine's meter measures (NVML on a GPU, RAPL where readable), calibration reads it around windows of
about two seconds: one with the device idle, and a few in which the engine runs one composition over and over (a
prefill, a large decode batch at a long context, batch 1), so FLOPs and bytes vary apart. Each window's joules are
fitted as ``idle x seconds + per-FLOP x FLOPs + per-byte x bytes`` (non-negative, least relative squares). NVML's
counter moves in steps of tens of milliseconds, hence windows of seconds, not single steps. Torch-free: windows are
saved with the measurements (their summed counts), so ``--refit`` refits them too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from joule.perf.fitting import nonnegative_least_squares
from joule.perf.measure import Scenario

MIN_WINDOWS = 3
# Compositions that load the device differently: compute-bound prefill, a decode batch whose KV reads dominate,
# batch 1 (weights streamed at low utilisation). Each runs over and over for a window; the decode ones generate
# long enough that their decode steps, not their prompts' prefill, take most of the window.
ENERGY_SCENARIOS = (
    Scenario("energy: prefill 1x700", (700,), 1),
    Scenario("energy: decode 16 @ 64", (64,) * 16, 40),
    Scenario("energy: decode 1 @ 64", (64,), 40),
)
GPU_ENERGY_SCENARIOS = (
    Scenario("energy: prefill 6x700", (700,) * 6, 1),
    Scenario("energy: decode 128 @ 300", (300,) * 128, 200),
    Scenario("energy: decode 1 @ 900", (900,), 128),
)


@dataclass(frozen=True)
class EnergyWindow:
    """What the meter counted over ``seconds`` of wall time while the engine did ``flops`` and moved ``bytes``."""

    name: str
    seconds: float
    flops: float
    bytes: float
    joules: float

    def __post_init__(self) -> None:
        if self.seconds <= 0 or min(self.flops, self.bytes, self.joules) < 0:
            raise ValueError(f"energy window {self.name!r}: seconds must be positive and counts non-negative")


def fit_energy(profile, windows: list[EnergyWindow], meter_name: str) -> bool:
    """Set the profile's idle power and per-FLOP / per-byte energies from ``windows`` (at least ``MIN_WINDOWS``,
    one of them idle); returns whether it did. A fit whose idle power exceeds the board's maximum is refused."""
    usable = [window for window in windows if window.joules > 0]
    if len(usable) < MIN_WINDOWS or not any(window.flops == 0 and window.bytes == 0 for window in usable):
        return False
    matrix = np.array([[window.seconds, window.flops, window.bytes] for window in usable], dtype=float)
    joules = np.array([window.joules for window in usable], dtype=float)
    weighted = matrix / joules[:, None]  # relative error: a 2 s idle window counts as much as a busy one
    scale = np.maximum(np.abs(weighted).max(axis=0), 1e-300)  # columns of ~1 s, ~1e15 FLOPs, ~1e12 bytes
    coefficients = nonnegative_least_squares(weighted / scale, np.ones(len(usable))) / scale
    idle_watts, per_flop, per_byte = (float(value) for value in coefficients)
    if profile.max_watts > 0 and idle_watts > profile.max_watts:
        return False
    profile.idle_watts, profile.energy_per_flop, profile.energy_per_byte = idle_watts, per_flop, per_byte
    errors = np.abs(matrix @ coefficients / joules - 1)
    profile.energy_source = (f"fitted to {meter_name} over {len(usable)} windows ({time.strftime('%Y-%m-%d')}), "
                             f"median |error| {100 * float(np.median(errors)):.1f}%")
    return True


def window_counts(step_model, shapes) -> tuple[float, float]:
    """FLOPs and bytes the step model counts for the steps of a window."""
    flops = moved = 0.0
    for shape in shapes:
        counts, _ = step_model.class_seconds(step_model.resolve_staging(shape))
        flops += sum(count.flops for count in counts.values())
        moved += sum(count.bytes for count in counts.values())
    return flops, moved


def measure_energy_windows(engine, step_model, scenarios, meter, window_seconds: float = 2.0,
                           idle_seconds: float = 2.0, log=None) -> list[EnergyWindow]:
    """An idle window, then one per scenario, run back to back until ``window_seconds`` have passed. ``meter``
    is read only at the windows' ends (an NVML read costs milliseconds)."""
    from joule.perf.measure import run_scenario

    windows = []
    started, before = time.perf_counter(), meter.read_joules()
    time.sleep(idle_seconds)
    windows.append(EnergyWindow("idle", time.perf_counter() - started, 0.0, 0.0, meter.read_joules() - before))
    for scenario in scenarios:
        shapes, seed = [], 0
        started, before = time.perf_counter(), meter.read_joules()
        while time.perf_counter() - started < window_seconds:
            shapes += [sample.shape for sample in run_scenario(engine, scenario, seed)]
            seed += 1
        seconds, joules = time.perf_counter() - started, meter.read_joules() - before
        flops, moved = window_counts(step_model, shapes)
        windows.append(EnergyWindow(scenario.name, seconds, flops, moved, joules))
        if log is not None:
            log(f"  energy window {scenario.name}: {joules / seconds:.1f} W over {seconds:.1f} s ({seed} runs)")
    return windows
