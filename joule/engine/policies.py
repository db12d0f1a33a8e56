"""Scheduling policies: which waiting request is admitted next and which running one yields.

The scheduler's mechanics (token budget, stall-free decodes, block reservation)
stay the same under every policy; a policy only orders. Pure Python.

- ``fcfs``: arrival order; the most recently admitted request is preempted first.
- ``priority``: lower ``Request.priority`` values first (vLLM's convention); a
  waiting request may preempt a running one of strictly lower priority.
- ``fair`` (``fair_policy.py``): virtual token counters per tenant (VTC), with
  latency protection for light tenants.
- ``deadline``: earliest deadline first. A request's deadline is its arrival
  plus its TTFT SLO; requests without one rank after all that have one, by
  arrival. The running request with the latest deadline yields first. The step's
  token budget follows Sarathi-Serve's rule: while running decodes carry TPOT
  SLOs, prompt tokens are cut so the predicted step time stays within the
  tightest of them (never below a floor, so prompts still progress).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Protocol

from joule.engine.request import Request
from joule.engine.step_time import StepTimeEstimator

DECODE_TOKEN_WEIGHT = 2
PROMPT_TOKEN_WEIGHT = 1
# Prompt tokens per step while the fair policy protects a tenant (``fair_policy.py``), unless the others need more
# to keep up. 128, not 512: on the H200 (Llama-3.2-1B shape, a light tenant beside a 67 req/s flood, 2026-12-04)
# the light tenant's p99 TTFT was 1.62x its solo value with 128 and 2.23x with 512, at 4,053 vs 5,075 output tok/s
# for the flood.
DEFAULT_FAIR_PROMPT_CAP = 128


@dataclass(frozen=True)
class StepShape:
    """How a policy narrows one step beyond the token budget.

    ``prompt_token_cap``: at most this many prompt tokens (None: the budget decides). A lane step
    (``lane_prompt_tokens`` > 0) carries only ``lane_tenant``'s decodes and that many of its waiting
    prompts' tokens; everyone else's work waits for this one short step. ``split_decode_tenants``: these
    tenants' decodes may run half per step, the half that waited longest, when the scheduler's step-time
    estimate says that shortens the step by more than a step's fixed cost. ``lane_finishes_prompts``: the lane
    step also carries the lane tenant's prompt chunks in progress, and is bounded by its own tokens only, not by
    ``prompt_token_cap`` (the fair policy keeping others up, whose cap may be wide).
    """

    prompt_token_cap: int | None = None
    lane_tenant: str | None = None
    lane_prompt_tokens: int = 0
    split_decode_tenants: frozenset = frozenset()
    lane_finishes_prompts: bool = False

    @property
    def is_lane(self) -> bool:
        return self.lane_prompt_tokens > 0


class SchedulingPolicy(Protocol):
    name: str

    def next_waiting(self, waiting: deque[Request]) -> Request: ...

    def choose_victim(self, running: list[Request]) -> Request: ...

    def may_preempt_for(self, candidate: Request, victim: Request, running: list[Request]) -> bool: ...

    def on_added(self, request: Request, waiting: deque[Request], running: list[Request]) -> None: ...

    def on_scheduled(self, request: Request, num_tokens: int, is_decode: bool) -> None: ...

    def token_budget(self, decodes: list[Request], max_tokens: int, step_time: StepTimeEstimator,
                     min_prefill_tokens: int) -> int: ...

    def step_shape(self, waiting: deque[Request], running: list[Request], now: float,
                   step_time: StepTimeEstimator | None = None) -> StepShape | None: ...

    def observe_step(self, num_prefill_tokens: int, num_decode_tokens: int, elapsed_seconds: float,
                     step_time: StepTimeEstimator) -> None: ...


class FirstComeFirstServed:
    name = "fcfs"

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return waiting[0]

    def choose_victim(self, running: list[Request]) -> Request:
        return running[-1]

    def may_preempt_for(self, candidate: Request, victim: Request, running: list[Request]) -> bool:
        return False

    def on_added(self, request: Request, waiting: deque[Request], running: list[Request]) -> None:
        pass

    def on_scheduled(self, request: Request, num_tokens: int, is_decode: bool) -> None:
        pass

    def token_budget(self, decodes: list[Request], max_tokens: int, step_time: StepTimeEstimator,
                     min_prefill_tokens: int) -> int:
        """Tokens this step may carry; every policy but ``deadline`` uses the whole budget."""
        return max_tokens

    def step_shape(self, waiting: deque[Request], running: list[Request], now: float,
                   step_time: StepTimeEstimator | None = None) -> StepShape | None:
        """A narrower step than the budget allows, or None (``fair`` only)."""
        return None

    def observe_step(self, num_prefill_tokens: int, num_decode_tokens: int, elapsed_seconds: float,
                     step_time: StepTimeEstimator) -> None:
        """An executed step (after the scheduler's estimator has seen it); only ``fair`` learns from it."""


class PriorityFirst(FirstComeFirstServed):
    name = "priority"

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return min(waiting, key=lambda request: (request.priority, request.arrival_time))

    def choose_victim(self, running: list[Request]) -> Request:
        # Lowest priority (largest value); among equals the most recently admitted.
        return max(reversed(running), key=lambda request: request.priority)

    def may_preempt_for(self, candidate: Request, victim: Request, running: list[Request]) -> bool:
        return candidate.priority < victim.priority


def deadline_key(request: Request) -> tuple:
    """Sort key: requests with a TTFT SLO by deadline (arrival + TTFT), then the rest by arrival."""
    ttft = request.slo.ttft_seconds if request.slo is not None else None
    if ttft is None:
        return (1, request.arrival_time)
    return (0, request.arrival_time + ttft)


class EarliestDeadlineFirst(FirstComeFirstServed):
    name = "deadline"

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return min(waiting, key=deadline_key)

    def choose_victim(self, running: list[Request]) -> Request:
        # Latest deadline (no SLO counts as latest); among equals the most recently admitted.
        return max(reversed(running), key=deadline_key)

    def token_budget(self, decodes: list[Request], max_tokens: int, step_time: StepTimeEstimator,
                     min_prefill_tokens: int) -> int:
        """Cut prompt tokens so the step fits the tightest running TPOT; decodes themselves are never cut."""
        tpots = [r.slo.tpot_seconds for r in decodes if r.slo is not None and r.slo.tpot_seconds is not None]
        coefficients = step_time.coefficients() if tpots else None
        if coefficients is None:
            return max_tokens  # no TPOT to protect, or no estimate yet: nothing to cut on
        prefill_room = coefficients.max_prefill_tokens(len(decodes), min(tpots))
        if prefill_room is None:
            return max_tokens
        return min(max_tokens, len(decodes) + max(prefill_room, min_prefill_tokens))


POLICIES = ("fcfs", "priority", "fair", "deadline")


def make_policy(name: str, fair_prompt_cap: int = DEFAULT_FAIR_PROMPT_CAP, fair_split_decodes: bool = False,
                fair_keep_up: bool = True, step_token_budget: int | None = None) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {name!r}.")
    if name == "fair":
        from joule.engine.fair_policy import VirtualTokenCounterFairness  # it builds on the classes here

        return VirtualTokenCounterFairness(protected_prompt_tokens=fair_prompt_cap, split_decodes=fair_split_decodes,
                                           keep_up=fair_keep_up, step_token_budget=step_token_budget)
    return {"fcfs": FirstComeFirstServed, "priority": PriorityFirst, "deadline": EarliestDeadlineFirst}[name]()
