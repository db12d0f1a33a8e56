"""`joule serve --step-log FILE`: the batch shape and wall time of every step a server runs, one JSON line each.

A line is a ``StepCheck`` row (``joule.perf.validate``, predicted 0), plus the step's start time: each
sequence's new tokens, cached context, whether it samples and whether it finished, and the engine's state around
the step (idle before it, queued behind the one before, dense decode copies). `joule simulate --replay-log REQUESTS
--step-log STEPS` predicts every logged step with the profile, so a server that runs slower than its simulation
shows whether its steps are slower than the step model says, or are different steps.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from joule.perf.json_files import read_json_lines
from joule.perf.validate import StepCheck, step_kind


class StepRecorder:
    """Records the engine's steps (it wraps the engine's executor to see each plan); one per engine loop."""

    def __init__(self, engine, path: str | Path):
        from joule.perf.measure import RecordingExecutor, decode_staging_of

        self._unwrapped = None  # the executor to put back on close, when this recorder wrapped it
        if not isinstance(engine.core.executor, RecordingExecutor):
            self._unwrapped = engine.core.executor
            engine.core.executor = RecordingExecutor(engine.core.executor, decode_staging_of(engine))
        self.engine = engine
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        opener = gzip.open if path.suffix == ".gz" else open
        self._file = opener(path, "at", encoding="utf-8")

    def write(self, outputs, started: float, seconds: float, after_idle: bool) -> None:
        """The step ``LLMEngine.step()`` just ran (``outputs`` its return), begun at ``started`` (time.time())."""
        core = self.engine.core
        if not core.last_step.num_sequences:
            return
        executor = core.executor
        shape = executor.last_shape
        if shape is None:
            return
        # The sequences' finishing marks set here, not through RecordingExecutor.with_events, and the row taken with
        # vars(), not asdict: those copies took 1.4 ms a 256-sequence step on the dev CPU, this 0.14 ms.
        finished = {output.request_id for output in outputs if output.finished}
        sequences = [[s.num_new_tokens, s.context_length, int(s.samples), int(request_id in finished)]
                     for s, request_id in zip(shape.sequences, executor.last_request_ids)]
        check = StepCheck("server", step_kind(shape), len(shape.sequences), shape.num_tokens, seconds, 0.0, sequences,
                          shape.staging, shape.staging_capacity, after_idle, shape.queued)
        row = dict(vars(check), time=started)
        self._file.write(json.dumps(row, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
        if self._unwrapped is not None:
            self.engine.core.executor = self._unwrapped


def read_step_log(path: str | Path) -> list[StepCheck]:
    """The logged steps as step checks (predicted 0 until ``validate.recheck`` predicts them), in order."""
    checks = []
    for number, row in read_json_lines(path):
        row.pop("time", None)
        try:
            checks.append(StepCheck(**row))
        except TypeError as error:
            raise ValueError(f"{path}: line {number} is not a step-log line ({error})") from None
    if not checks:
        raise ValueError(f"{path}: no steps")
    return checks
