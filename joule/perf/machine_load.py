"""Is the machine quiet enough to measure: other processes' CPU share, a memory-copy probe, best-of timing.

Measurements on a shared 2-core VM are only as good as the minutes they ran in; calibration and validation
use these to wait for quiet, to repeat contended runs, and to record how fast memory was at the time.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Self

import numpy as np


def _timed(function, repeats: int, synchronize, attempts: int = 3) -> float:
    """Fastest of ``repeats`` runs after a warm-up: other jobs on the machine only ever add time. When
    other processes took more than ``CONTENDED_SHARE`` of the CPU meanwhile, the whole measurement is
    repeated (up to ``attempts`` times) and the fastest time of all kept."""
    best = float("inf")
    for _ in range(attempts):
        with ForeignLoad() as load:
            function()
            synchronize()
            for _ in range(repeats):
                started = time.perf_counter()
                function()
                synchronize()
                best = min(best, time.perf_counter() - started)
        if load.share <= CONTENDED_SHARE:
            break
    return best


def _cpu_busy_fraction(interval: float = 0.25) -> float:
    """Share of all cores busy over ``interval`` (Linux /proc/stat); 0 where unavailable."""
    def read():
        with open("/proc/stat") as stat:
            values = [int(v) for v in stat.readline().split()[1:]]
        return sum(values), values[3] + values[4]

    try:
        total_before, idle_before = read()
        time.sleep(interval)
        total_after, idle_after = read()
    except OSError:
        return 0.0
    total = total_after - total_before
    return 1.0 - (idle_after - idle_before) / total if total else 0.0


@dataclass
class ForeignLoad:
    """Measures how much CPU other processes used while a measurement ran (Linux /proc/stat).

    ``share`` is their busy CPU time over wall time x cores: 0 on a quiet machine, ~0.5 when
    another job keeps one of two cores busy. It tells a clean measurement from a contended one.
    """

    started_wall: float = 0.0
    busy_jiffies: int = 0
    own_seconds: float = 0.0
    share: float = 0.0

    @staticmethod
    def _busy_jiffies() -> int | None:
        try:
            with open("/proc/stat") as stat:
                values = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return sum(values[:8]) - values[3] - values[4]  # all but idle and iowait (guest is in user)

    @staticmethod
    def _own_seconds() -> float:
        times = os.times()
        return times.user + times.system

    def __enter__(self) -> Self:
        self.started_wall, self.own_seconds = time.perf_counter(), self._own_seconds()
        self.busy_jiffies = self._busy_jiffies() or 0
        return self

    def __exit__(self, *exc) -> None:
        busy = self._busy_jiffies()
        wall = time.perf_counter() - self.started_wall
        if busy is None or wall <= 0:
            self.share = 0.0
            return
        busy_seconds = (busy - self.busy_jiffies) / os.sysconf("SC_CLK_TCK")
        foreign = busy_seconds - (self._own_seconds() - self.own_seconds)
        self.share = max(0.0, foreign / (wall * (os.cpu_count() or 1)))


def copy_bandwidth(megabytes: int = 128, repeats: int = 3) -> float:
    """Bytes/s of a large memory copy (read + write), best of ``repeats``: a cheap probe of how fast
    the machine is right now, since neighbours on a shared host slow it without showing in /proc/stat."""
    source = np.ones((megabytes << 20) // 8)
    target = np.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        np.copyto(target, source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.nbytes / best


CONTENDED_SHARE = 0.15  # other processes' share of the CPU above which a measurement counts as contended


def wait_for_quiet(max_wait_s: float = 10.0, threshold: float = 0.3) -> float:
    """Wait (up to ``max_wait_s``) until other jobs leave the CPU mostly idle; returns the busy share seen."""
    deadline = time.monotonic() + max_wait_s
    busy = _cpu_busy_fraction()
    while busy > threshold and time.monotonic() < deadline:
        time.sleep(0.5)
        busy = _cpu_busy_fraction()
    return busy
