"""EngineCore: the loop of schedule -> execute -> update, with no torch in sight."""

from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from joule.engine.kv_blocks import KVBlockManager
from joule.engine.plan import Executor, StepPlan, StepResult
from joule.engine.request import FINISHED_STATUSES, Request, RequestStatus
from joule.engine.scheduler import Scheduler
from joule.engine.scheduler_config import SchedulerConfig

_status_of = operator.attrgetter("request.status")


@dataclass
class StepStats:
    """Bookkeeping for one step, for metrics and the energy ledger."""

    num_sequences: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    elapsed_seconds: float = 0.0
    energy_joules: float | None = None
    preempted_request_ids: list[str] = field(default_factory=list)


class StepObserver(Protocol):
    """Told when each step begins and ends, so an energy ledger (``joule.energy``) can meter it.

    Injected rather than imported so this package stays free of meters and torch.
    """

    def step_began(self, now: float, requests: Iterable[Request]) -> None: ...

    def step_ended(self, plan: StepPlan, now: float) -> float | None: ...


class EngineCore:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        block_manager: KVBlockManager,
        executor: Executor,
        clock: Callable[[], float] = time.time,
        step_observer: StepObserver | None = None,
        decode_lookahead: bool = False,
    ):
        """``decode_lookahead``: with an executor that can ``launch``/``collect`` (the model executor), queue
        the next step behind the current one before reading its tokens, so the host's scheduling and output
        work overlaps the device's (see ``_launch_continuation``): decode steps, and under fcfs and priority steps
        with prompt chunks too (``SchedulerConfig.lookahead_prompts``, ``continuation.py``)."""
        self.block_manager = block_manager
        self.scheduler = Scheduler(scheduler_config, block_manager)
        self.executor = executor
        self.clock = clock
        self.step_observer = step_observer
        self.last_step = StepStats()
        self.decode_lookahead = decode_lookahead and hasattr(executor, "launch")
        self._ahead: tuple[StepPlan, object] | None = None  # a continuation step in flight

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_request(self, request_id: str) -> Request | None:
        return self.scheduler.abort_request(request_id)

    def finish_request(self, request_id: str, stop_reason: int | str | None = None) -> None:
        """End a request early (a stop string was found after detokenizing)."""
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish_request(request, RequestStatus.FINISHED_STOPPED, stop_reason)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self._ahead is not None

    @property
    def has_step_in_flight(self) -> bool:
        """A continuation was launched and is not collected yet (one more ``step`` drains it)."""
        return self._ahead is not None

    def step(self) -> list[Request]:
        now = self.clock()
        if self.step_observer is not None:
            self.step_observer.step_began(now, self.scheduler.requests.values())
        launched = None
        if self._ahead is not None:
            plan, launched = self._ahead
            self._ahead = None
            # Requests that ended with the step before (stop token or string, abort) computed one token more:
            # dropped here, so neither the update nor the energy ledger sees them again.
            finished = FINISHED_STATUSES
            if not finished.isdisjoint(map(_status_of, plan.sequences)):  # one pass in C; a rebuild when needed
                plan.sequences = [sequence for sequence in plan.sequences if sequence.request.status not in finished]
            if plan.is_empty:
                self.executor.collect(launched)
        else:
            plan = self.scheduler.schedule(now=now)
            if not plan.is_empty and self.decode_lookahead:
                launched = self.executor.launch(plan)
        if plan.is_empty:
            self.last_step = StepStats(preempted_request_ids=plan.preempted_request_ids)
            if self.step_observer is not None:
                self.last_step.energy_joules = self.step_observer.step_ended(plan, self.clock())
            return []
        if launched is not None:
            self._launch_continuation(plan, launched, now)
            result: StepResult = self.executor.collect(launched)
        else:
            result = self.executor.execute(plan)
        num_prefill_tokens, num_decode_tokens = plan.token_counts()
        self.last_step = StepStats(
            num_sequences=len(plan.sequences),
            num_prefill_tokens=num_prefill_tokens,
            num_decode_tokens=num_decode_tokens,
            elapsed_seconds=result.elapsed_seconds,
            energy_joules=result.energy_joules,
            preempted_request_ids=plan.preempted_request_ids,
        )
        self.scheduler.observe_step(num_prefill_tokens, num_decode_tokens, result.elapsed_seconds)
        progressed = self.scheduler.update(plan, result)
        if self.step_observer is not None:
            metered = self.step_observer.step_ended(plan, self.clock())
            if metered is not None:
                self.last_step.energy_joules = metered
        return progressed

    def _launch_continuation(self, plan: StepPlan, launched, now: float) -> None:
        """Queue the step after ``plan`` before ``plan``'s tokens reach the host.

        Its requests are ``plan``'s, each one position or one prompt chunk on, and (fcfs, priority) waiting
        requests it admits; its decodes' inputs are ``plan``'s tokens, copied on the device. A request that ends with
        ``plan``'s token (a stop token, a stop string, an abort) is skipped when the continuation is applied,
        its extra token dropped; the KV slots it wrote were its own, past every cached block, and its blocks
        are reused only by work queued behind it. Not done for sampling that needs the host, or where
        ``Scheduler.schedule_continuation`` declines.
        """
        if not self.executor.can_continue(launched):
            return
        continuation = self.scheduler.schedule_continuation(plan, now)
        if continuation is not None:
            self._ahead = (continuation, self.executor.launch(continuation, previous=launched))


def lookahead_on(setting: bool | None, on_gpu: bool) -> bool:
    """``decode_lookahead`` resolved: auto (None) queues decode steps ahead on a GPU only. There the host's
    scheduling and output work overlaps the device (H200: batch-1 decode 765 -> 909 tok/s, docs/benchmarks.md);
    on the CPU the model runs on the cores that would do that work, and a stopping request's extra token would
    be pure cost. The engine, the simulator and validation all resolve it here."""
    return on_gpu if setting is None else setting
