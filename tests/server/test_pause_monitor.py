"""Collector pauses and event-loop lag reach /metrics, from the API process and from the engine's."""

from __future__ import annotations

import asyncio
import gc
import time

from prometheus_client.parser import text_string_to_metric_families

from helpers.silent_channel import SilentChannel

from joule.server.async_engine import AsyncEngine
from joule.server.engine_loop import EngineReport
from joule.server.metrics import ServerMetrics
from joule.server.pause_monitor import EventLoopLagMonitor, GcPauseRecorder


def _samples(metrics: ServerMetrics, name: str) -> dict[tuple, float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


def test_the_recorder_times_each_collection_with_its_generation_and_drains_once():
    ticks = iter([10.0, 10.25, 20.0, 20.5])
    recorder = GcPauseRecorder(clock=lambda: next(ticks))
    recorder._callback("start", {"generation": 2})
    recorder._callback("stop", {"generation": 2, "collected": 0, "uncollectable": 0})
    recorder._callback("start", {"generation": 0})
    recorder._callback("stop", {"generation": 0, "collected": 0, "uncollectable": 0})
    assert recorder.drain() == [(2, 0.25), (0, 0.5)]
    assert recorder.drain() == []


def test_an_installed_recorder_sees_a_real_full_collection_and_uninstalls_cleanly():
    recorder = GcPauseRecorder().install()
    try:
        gc.collect()
        pauses = recorder.drain()
    finally:
        recorder.uninstall()
    assert any(generation == 2 and seconds >= 0.0 for generation, seconds in pauses)
    assert recorder._callback not in gc.callbacks


def test_a_blocked_event_loop_shows_up_as_lag_and_the_gc_pauses_are_passed_on():
    lags: list[float] = []
    passed: list[list[tuple[int, float]]] = []
    recorder = GcPauseRecorder()

    async def scenario():
        monitor = EventLoopLagMonitor(lags.append, interval=0.005, gc_pauses=recorder, observe_gc=passed.append)
        monitor.start()
        await asyncio.sleep(0.03)
        time.sleep(0.12)  # a handler that holds the loop
        recorder._pauses.append((2, 0.07))
        await asyncio.sleep(0.03)
        await monitor.stop()

    asyncio.run(scenario())
    assert max(lags) >= 0.1 and min(lags) < 0.1
    assert passed == [[(2, 0.07)]]


def test_metrics_count_pauses_per_process_and_generation():
    metrics = ServerMetrics("m")
    metrics.on_gc_pauses("api", [(0, 0.0004), (2, 0.2)])
    metrics.on_event_loop_lag(0.03)
    counts = _samples(metrics, "joule:gc_pause_seconds_count")
    assert counts[(("generation", "2"), ("model_name", "m"), ("process", "api"))] == 1
    assert counts[(("generation", "0"), ("model_name", "m"), ("process", "api"))] == 1
    assert _samples(metrics, "joule:event_loop_lag_seconds_sum")[(("model_name", "m"),)] == 0.03



def test_the_engine_process_pauses_in_a_report_are_counted_as_the_engines():
    metrics = ServerMetrics("m")
    engine = AsyncEngine(SilentChannel(), metrics=metrics)
    engine._apply(EngineReport(gc_pauses=[(1, 0.003), (2, 0.15)]))
    sums = _samples(metrics, "joule:gc_pause_seconds_sum")
    assert sums[(("generation", "2"), ("model_name", "m"), ("process", "engine"))] == 0.15
    assert sums[(("generation", "1"), ("model_name", "m"), ("process", "engine"))] == 0.003


def test_the_engine_loop_drains_its_recorder_into_every_report():
    from joule.server.engine_loop import EngineLoop

    class _Idle:
        class core:
            class scheduler:
                num_running = num_waiting = num_preemptions = 0

        class block_manager:
            usage = 0.0
            num_used_blocks = num_blocks = prefix_cache_queries = prefix_cache_hits = 0

    recorder = GcPauseRecorder()
    recorder._pauses.append((2, 0.09))
    loop = EngineLoop(_Idle(), receive=lambda timeout: None, send=lambda report: None, gc_pauses=recorder)
    assert loop._report(EngineReport()).gc_pauses == [(2, 0.09)]
    assert loop._report(EngineReport()).gc_pauses == []


def test_the_idle_collector_collects_only_when_idle_after_its_interval_and_enough_allocations():
    from joule.server.pause_monitor import IdleCollector

    now = [100.0]
    idle = [False]
    collector = IdleCollector(lambda: idle[0], min_new_objects=0, min_interval=1.0, clock=lambda: now[0])
    now[0] += 2.0
    assert not collector.maybe_collect()  # requests in flight: no pause for them
    idle[0] = True
    assert collector.maybe_collect()
    assert not collector.maybe_collect()  # within the interval of the last one
    now[0] += 1.5
    assert collector.maybe_collect()
    now[0] += 5.0
    quiet = IdleCollector(lambda: True, min_new_objects=10**12, clock=lambda: now[0])
    now[0] += 5.0
    assert not quiet.maybe_collect()  # too little allocated since the last collection to bother
