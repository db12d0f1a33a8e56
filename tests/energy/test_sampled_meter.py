"""The background-sampled meter: cheap reads, extrapolated between samples, never backwards."""

from __future__ import annotations

import pytest

from joule.energy.sampled import BackgroundSampledMeter


class ScriptedMeter:
    name = "scripted"
    source = "measured"

    def __init__(self):
        self.joules = 0.0
        self.reads = 0

    def read_joules(self) -> float:
        self.reads += 1
        return self.joules


class ManualClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_reads_extrapolate_at_the_last_measured_power_without_touching_the_inner_meter():
    inner, clock = ScriptedMeter(), ManualClock()
    meter = BackgroundSampledMeter(inner, interval_seconds=0.05, clock=clock, start_thread=False)
    clock.now, inner.joules = 1.0, 100.0  # 100 W
    meter.sample()
    reads = inner.reads
    clock.now = 1.5
    assert meter.read_joules() == pytest.approx(150.0)
    assert inner.reads == reads  # the hot path never reads the slow counter


def test_readings_never_go_backwards_and_catch_up_with_the_counter():
    inner, clock = ScriptedMeter(), ManualClock()
    meter = BackgroundSampledMeter(inner, clock=clock, start_thread=False)
    clock.now, inner.joules = 1.0, 100.0
    meter.sample()
    clock.now = 2.0
    assert meter.read_joules() == pytest.approx(200.0)  # extrapolated at 100 W
    inner.joules = 120.0  # the GPU went idle: the real counter is behind the estimate
    meter.sample()
    assert meter.read_joules() == pytest.approx(200.0)  # held, not lowered
    clock.now, inner.joules = 5.0, 300.0
    meter.sample()
    assert meter.read_joules() == pytest.approx(300.0)


def test_thread_samples_and_stops():
    inner = ScriptedMeter()
    meter = BackgroundSampledMeter(inner, interval_seconds=0.01)
    inner.joules = 5.0
    import time

    deadline = time.time() + 2.0
    while meter.read_joules() < 5.0 and time.time() < deadline:
        time.sleep(0.01)
    meter.close()
    assert meter.read_joules() >= 5.0
    with pytest.raises(ValueError, match="interval_seconds"):
        BackgroundSampledMeter(inner, interval_seconds=0)


def test_the_thread_stops_once_its_meter_is_dropped():
    """An engine dropped without a close (a benchmark builds several in one process) leaves no thread sampling."""
    import gc
    import time

    inner = ScriptedMeter()
    meter = BackgroundSampledMeter(inner, interval_seconds=0.01)
    thread = meter._thread
    deadline = time.time() + 2.0
    while inner.reads < 3 and time.time() < deadline:  # sampling
        time.sleep(0.01)
    assert inner.reads >= 3 and thread.is_alive()
    del meter
    gc.collect()
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    reads = inner.reads
    time.sleep(0.05)
    assert inner.reads == reads
