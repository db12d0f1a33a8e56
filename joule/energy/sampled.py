"""Reading a slow energy counter off the engine's hot path.

NVML's energy counter costs milliseconds per read (measured ~3 ms on an H100/H200), which would
double a CUDA-graph decode step. ``BackgroundSampledMeter`` reads the inner meter on its own thread
every ``interval_seconds``; ``read_joules`` returns the last sample extrapolated at the last measured
power, so steps between samples still see energy in proportion to their time. Readings never go
backwards; an over-estimate is absorbed when the real counter catches up, so totals stay the
meter's own to within one interval of power. The thread holds the meter only weakly and stops once the meter is
collected, so an engine that is dropped (a benchmark builds several in one process) leaves no thread reading NVML.
"""

from __future__ import annotations

import threading
import time
import weakref
from typing import Callable

from joule.energy.meter import EnergyMeter


class BackgroundSampledMeter:
    def __init__(
        self,
        inner: EnergyMeter,
        interval_seconds: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        start_thread: bool = True,
    ):
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be positive, got {interval_seconds}.")
        self.inner = inner
        self.name = f"{inner.name} (sampled every {interval_seconds * 1000:.0f} ms)"
        self.source = inner.source
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._sample_joules = inner.read_joules()
        self._sample_time = clock()
        self._power_watts = 0.0
        self._last_returned = self._sample_joules
        self._stopped = threading.Event()
        self._thread = None
        if start_thread:
            self._thread = threading.Thread(target=_sample_until_stopped,
                                            args=(weakref.ref(self), self._stopped, interval_seconds),
                                            name="joule-energy-sampler", daemon=True)
            self._thread.start()

    def sample(self) -> None:
        """Take one reading of the inner meter (the thread calls this; tests may call it directly)."""
        joules = self.inner.read_joules()
        now = self._clock()
        with self._lock:
            elapsed = now - self._sample_time
            if elapsed > 0 and joules >= self._sample_joules:
                self._power_watts = (joules - self._sample_joules) / elapsed
            self._sample_joules, self._sample_time = joules, now

    def read_joules(self) -> float:
        with self._lock:
            estimate = self._sample_joules + self._power_watts * max(0.0, self._clock() - self._sample_time)
            self._last_returned = max(self._last_returned, estimate)
            return self._last_returned

    def close(self) -> None:
        self._stopped.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def _sample_until_stopped(meter_reference: weakref.ref, stopped: threading.Event, interval_seconds: float) -> None:
    """The sampler thread's loop; it holds the meter only while it samples."""
    while not stopped.wait(interval_seconds):
        meter = meter_reference()
        if meter is None:
            return
        try:
            meter.sample()
        except Exception:  # a failed read keeps the last sample; the next one catches up
            pass
        del meter
