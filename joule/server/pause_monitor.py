"""Where a server process stops answering: the cyclic collector's pauses and the event loop's lag.

A light tenant's time to first token can grow by a pause of either process while nothing is wrong
with scheduling: a full collection walking hundreds of thousands of objects, or an event loop busy
writing hundreds of streams. Both go to /metrics (``joule:gc_pause_seconds`` per process and
generation, ``joule:event_loop_lag_seconds``) so a slow tail can be told apart from a slow engine.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Callable

GcPause = tuple[int, float]  # (generation collected, seconds)


class GcPauseRecorder:
    """Times every collection of this process through ``gc.callbacks``; ``drain()`` hands them over.

    Collections never overlap (the collector holds the interpreter lock), so one start time suffices;
    the pauses are appended from whichever thread collected and swapped out whole by ``drain``.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._started: float | None = None
        self._pauses: list[GcPause] = []

    def install(self) -> GcPauseRecorder:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = self._clock()
        elif self._started is not None:
            self._pauses.append((int(info.get("generation", 0)), self._clock() - self._started))
            self._started = None

    def drain(self) -> list[GcPause]:
        pauses, self._pauses = self._pauses, []
        return pauses


class IdleCollector:
    """A full collection while nothing is in flight, when enough has been allocated since the last one.

    The API process raises the collector's threshold so far (``joule.server.cli``) that a busy server
    rarely collects by itself; cyclic garbage of finished requests is swept here instead, when a pause
    costs nobody anything.
    """

    def __init__(self, idle: Callable[[], bool], min_new_objects: int = 10_000, min_interval: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self._idle = idle
        self._min_new_objects = min_new_objects
        self._min_interval = min_interval
        self._clock = clock
        self._last = clock()

    def maybe_collect(self) -> bool:
        now = self._clock()
        if now - self._last < self._min_interval or gc.get_count()[0] < self._min_new_objects or not self._idle():
            return False
        self._last = now
        gc.collect()
        return True


class EventLoopLagMonitor:
    """Sleeps ``interval`` seconds at a time and reports how late each wake-up came (the loop's lag).

    Each tick also passes the API process's collector pauses on, so they reach /metrics without a
    scrape having to happen first, and gives the idle collector its chance.
    """

    def __init__(self, observe_lag: Callable[[float], None], interval: float = 0.01,
                 gc_pauses: GcPauseRecorder | None = None, observe_gc: Callable[[list[GcPause]], None] | None = None,
                 idle_collector: IdleCollector | None = None):
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}.")
        self._observe_lag = observe_lag
        self._interval = interval
        self._gc_pauses = gc_pauses
        self._observe_gc = observe_gc
        self._idle_collector = idle_collector
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="joule-loop-lag")

    async def stop(self) -> None:
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        self._flush_gc()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(self._interval)
            self._observe_lag(max(0.0, loop.time() - started - self._interval))
            if self._idle_collector is not None:
                self._idle_collector.maybe_collect()
            self._flush_gc()

    def _flush_gc(self) -> None:
        if self._gc_pauses is not None and self._observe_gc is not None:
            pauses = self._gc_pauses.drain()
            if pauses:
                self._observe_gc(pauses)
