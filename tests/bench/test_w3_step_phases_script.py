"""benchmarks/gpu/w3_step_phases.py's bookkeeping on the CPU (its runs need CUDA): each wrapped call's time lands in
its step's phase, a call that begins a step opens a row, and the step ranges it summarises fit both workloads."""

from __future__ import annotations

import time

from helpers.scripts import BENCHMARKS, load_script

script = load_script(BENCHMARKS / "gpu" / "w3_step_phases.py", "w3_step_phases")


class Engine:
    def step(self):
        time.sleep(0.002)
        return []


class Scheduler:
    def update(self):
        time.sleep(0.001)


def test_wrapped_calls_add_their_time_to_the_current_step(capsys):
    log, engine, scheduler = script.StepLog(), Engine(), Scheduler()
    script.wrap(log, engine, "step", "engine step", begins_step=True)
    script.wrap(log, scheduler, "update", "update")
    scheduler.update()  # before the first step: nowhere to add it, and no error
    for _ in range(3):
        engine.step()
        scheduler.update()
        scheduler.update()
    assert log.step == 2 and len(log.rows) == 3
    for row in log.rows:
        assert row["engine step"] >= 2.0 and row["update"] >= 2.0  # milliseconds
    wrapped_int = 5
    script.wrap(log, wrapped_int, "bit_length", "int bits")  # an object without instance attributes: skipped
    assert "not timed: int bits" in capsys.readouterr().out


def test_step_ranges_cover_the_decode_steps_of_each_workload():
    assert script.step_ranges(257, batch_one=True) == ((1, 257),)
    assert script.step_ranges(144, batch_one=False) == ((18, 126), (126, 144))


def test_a_wrapped_call_counts_what_grew_during_it():
    log, engine, allocations = script.StepLog(), Engine(), iter([0, 2, 2, 5])
    script.wrap(log, engine, "step", "engine step", begins_step=True, count=lambda: next(allocations))
    engine.step()
    engine.step()
    assert [round(row["engine step count"]) for row in log.rows] == [2, 3]
    log.reset()
    assert log.step == -1 and log.rows == []


def test_cold_steps_over_the_threshold_are_listed_with_their_phase_differences():
    cold = [{"engine step": 30.0, "launch": 25.0, "collect": 1.0}, {"engine step": 3.2, "launch": 1.5},
            {"engine step": 9.0, "gc gen1": 5.5, "launch": 1.5}]
    warm = [{"engine step": 26.0, "launch": 21.0, "collect": 1.05}, {"engine step": 3.0, "launch": 1.5},
            {"engine step": 3.1, "launch": 1.5}]
    slower = script.cold_against_warm(cold, warm)
    assert slower == [{"step": 0, "engine step": 4.0, "launch": 4.0}, {"step": 2, "engine step": 5.9, "gc gen1": 5.5}]
