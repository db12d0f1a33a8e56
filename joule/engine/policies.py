"""Scheduling policies: which waiting request is admitted next and which running one yields.

The scheduler's mechanics (token budget, stall-free decodes, block reservation)
stay the same under every policy; a policy only orders. Pure Python.

- ``fcfs``: arrival order; the most recently admitted request is preempted first.
- ``priority``: lower ``Request.priority`` values first (vLLM's convention); a
  waiting request may preempt a running one of strictly lower priority.
- ``fair``: virtual token counters per tenant (VTC): the tenant that has been
  served the fewest weighted tokens goes next, so one heavy tenant cannot
  starve the others. Prompt tokens weigh 1, generated tokens 2.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from joule.engine.request import Request

DECODE_TOKEN_WEIGHT = 2
PROMPT_TOKEN_WEIGHT = 1


class SchedulingPolicy(Protocol):
    name: str

    def next_waiting(self, waiting: deque[Request]) -> Request: ...

    def choose_victim(self, running: list[Request]) -> Request: ...

    def may_preempt_for(self, candidate: Request, victim: Request) -> bool: ...

    def on_added(self, request: Request, waiting: deque[Request], running: list[Request]) -> None: ...

    def on_scheduled(self, request: Request, num_tokens: int, is_decode: bool) -> None: ...


class FirstComeFirstServed:
    name = "fcfs"

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return waiting[0]

    def choose_victim(self, running: list[Request]) -> Request:
        return running[-1]

    def may_preempt_for(self, candidate: Request, victim: Request) -> bool:
        return False

    def on_added(self, request: Request, waiting: deque[Request], running: list[Request]) -> None:
        pass

    def on_scheduled(self, request: Request, num_tokens: int, is_decode: bool) -> None:
        pass


class PriorityFirst(FirstComeFirstServed):
    name = "priority"

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return min(waiting, key=lambda request: (request.priority, request.arrival_time))

    def choose_victim(self, running: list[Request]) -> Request:
        # Lowest priority (largest value); among equals the most recently admitted.
        return max(reversed(running), key=lambda request: request.priority)

    def may_preempt_for(self, candidate: Request, victim: Request) -> bool:
        return candidate.priority < victim.priority


class VirtualTokenCounterFairness(FirstComeFirstServed):
    name = "fair"

    def __init__(self) -> None:
        self.counters: dict[str | None, float] = {}

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return min(waiting, key=lambda request: self.counters.get(request.tenant, 0.0))

    def choose_victim(self, running: list[Request]) -> Request:
        return max(reversed(running), key=lambda request: self.counters.get(request.tenant, 0.0))

    def on_added(self, request: Request, waiting: deque[Request], running: list[Request]) -> None:
        """A tenant returning from idle starts at the least-served active tenant's counter, no lower."""
        others = [other for other in [*waiting, *running] if other is not request]
        if any(other.tenant == request.tenant for other in others):
            return  # already backlogged: keeps its counter
        floor = min((self.counters.get(other.tenant, 0.0) for other in others), default=None)
        if floor is not None:
            self.counters[request.tenant] = max(self.counters.get(request.tenant, 0.0), floor)

    def on_scheduled(self, request: Request, num_tokens: int, is_decode: bool) -> None:
        weight = DECODE_TOKEN_WEIGHT if is_decode else PROMPT_TOKEN_WEIGHT
        self.counters[request.tenant] = self.counters.get(request.tenant, 0.0) + weight * num_tokens


POLICIES = {"fcfs": FirstComeFirstServed, "priority": PriorityFirst, "fair": VirtualTokenCounterFairness}


def make_policy(name: str) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {name!r}.")
    return POLICIES[name]()
