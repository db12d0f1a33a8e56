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
