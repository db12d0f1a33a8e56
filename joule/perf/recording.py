"""Calibration's and validation's view of the engine's steps: an executor wrapper that remembers each step's batch
shape (with its request ids and whether the decode lookahead queued it), as the step model reads it."""

from __future__ import annotations

from dataclasses import replace

from joule.perf.step_model import BatchShape, DecodeStaging


class RecordingExecutor:
    """Wraps the engine's executor to remember the batch shape of the last plan (with its staging
    mode, when the engine's attention keeps dense decode copies: see ``DecodeStaging``).

    Why lazily: building a shape walks every sequence, ~15 % of a queued 64-row step's host work on the dev CPU
    (``benchmarks/cpu/host_step.py --recording``), which calibration then charged to the engine. A step keeps its
    plan (the engine never changes a plan once scheduled) and the shape is built when read, after ``step()``
    returns. A staging backend's modes follow the plans in order, so there the shape is built at launch."""

    def __init__(self, inner, staging: DecodeStaging | None = None):
        self.inner = inner
        self.staging = staging
        # (the plan, or with a staging backend (its shape, its request ids); queued)
        self._last: tuple[object, bool] | None = None
        self._last_shape: BatchShape | None = None
        self._launched: dict[int, tuple[object, bool]] = {}

    def __getattr__(self, name: str):
        """Anything else is the wrapped executor's (a server keeps using it as its own)."""
        if name in ("inner", "_last", "_launched"):  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def last_shape(self) -> BatchShape | None:
        """The batch shape of the last step executed or collected (None before the first)."""
        if self._last_shape is None and self._last is not None:
            observed, queued = self._last
            shape = observed[0] if isinstance(observed, tuple) else BatchShape.from_plan(observed)
            self._last_shape = replace(shape, queued=queued)
        return self._last_shape

    @property
    def last_request_ids(self) -> list[str]:
        """The last step's request ids, in the order of ``last_shape``'s sequences."""
        if self._last is None:
            return []
        observed = self._last[0]
        return observed[1] if isinstance(observed, tuple) else list(map(_request_id_of, observed.sequences))

    def with_events(self, outputs, after_idle: bool, metered: bool = True) -> BatchShape | None:
        """The last step's shape marked with its request events: the sequences whose requests the step
        finished (``outputs`` of ``LLMEngine.step()``) and whether the engine sat idle before it; and
        whether the engine metered it."""
        shape = self.last_shape
        if shape is None:
            return None
        finished = {output.request_id for output in outputs if output.finished}
        sequences = [replace(sequence, finishes=request_id in finished)
                     for sequence, request_id in zip(shape.sequences, self.last_request_ids)]
        return replace(shape, sequences=sequences, after_idle=after_idle, metered=metered)

    def execute(self, plan):
        self._remember(self._observe(plan), queued=False)
        return self.inner.execute(plan)

    # The engine's decode lookahead: a step is launched before the previous one is collected, so each
    # launched step keeps its own plan until ``collect`` makes it the last one.
    def can_continue(self, launched) -> bool:
        return self.inner.can_continue(launched)

    def launch(self, plan, previous=None):
        observed = self._observe(plan), previous is not None
        launched = self.inner.launch(plan, previous)
        self._launched[id(launched)] = observed
        return launched

    def collect(self, launched):
        self._remember(*self._launched.pop(id(launched)))
        return self.inner.collect(launched)

    def _remember(self, observed, queued: bool) -> None:
        self._last, self._last_shape = (observed, queued), None

    def _observe(self, plan):
        """The plan itself, or with a staging backend its shape now (the staging modes follow the plans' order)."""
        if self.staging is None:
            return plan
        shape = BatchShape.from_plan(plan)
        self.staging.observe_plan(plan, shape)
        return shape, [sequence.request_id for sequence in plan.sequences]


def _request_id_of(sequence) -> str:
    return sequence.request_id
