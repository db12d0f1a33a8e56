"""How much slower (or faster) this host is than a profile's calibration host, fitted to measured steps.

Why: machines lent as one GPU kind differ up to 2x in host speed, and a profile's host terms describe the host it was
calibrated on. The host probe (``joule.perf.host_probe``) was meant to tell the hosts apart, but it read 74-126 ms on
one machine within minutes, while one factor on the host terms, fitted to a validation's step grid, was about the
same (x1.56, x1.72) on both of that machine's grids and took a profile calibrated on the other host from 17-19 % to
3.5-3.9 % median step error (docs/perf-model.md, H100 2026-12-06 (l)). Fitting that factor needs only the measured
steps a validation already saves.

It describes steps timed one by one. Runs with the decode lookahead (queued steps, whose host work hides behind the
device) follow it less: on that machine the offline run's simulation went from +11 % to -15 % in throughput with it, so it
is a reading of the host, and ``joule simulate --host-scale`` a what-if, not a correction to apply blindly.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from joule.model.config import ModelConfig
from joule.perf.profile import DeviceProfile
from joule.perf.step_model import StepModel
from joule.perf.validate import StepCheck, recheck

# Geometric steps of 2.5 % from a host four times as fast to one four times as slow, through 1.
SCALE_GRID = tuple(round(1.025 ** step, 4) for step in range(-56, 57))


@dataclass(frozen=True)
class HostScaleFit:
    scale: float  # the profile's host terms times this fit the measured steps best
    median_abs_error: float  # of the steps' predictions with it
    unscaled_median_abs_error: float  # ... and with the profile as it is

    def describe(self) -> str:
        return (f"host terms x{self.scale:.2f} fit these steps best: median |error| {self.median_abs_error:.1%} "
                f"(x1.00: {self.unscaled_median_abs_error:.1%}), this host's step-by-step work against the "
                "calibration host's")


def median_abs_error(checks: list[StepCheck], model_config: ModelConfig, profile: DeviceProfile) -> float:
    return statistics.median(abs(check.error) for check in recheck(checks, StepModel(model_config, profile)))


def fit_host_scale(checks: list[StepCheck], model_config: ModelConfig, profile: DeviceProfile) -> HostScaleFit:
    """The grid factor with the smallest median absolute step error (the first of equals nearest 1)."""
    if not checks:
        raise ValueError("fit_host_scale: no measured steps to fit the host scale to")
    errors = {scale: median_abs_error(checks, model_config, profile.with_host_scale(scale)) for scale in SCALE_GRID}
    best = min(errors, key=lambda scale: (errors[scale], abs(scale - 1.0)))
    return HostScaleFit(best, errors[best], median_abs_error(checks, model_config, profile))
