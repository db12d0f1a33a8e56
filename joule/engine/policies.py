"""Scheduling policies: which waiting request is admitted next and which running one yields.

The scheduler's mechanics (token budget, stall-free decodes, block reservation)
stay the same under every policy; a policy only orders. Pure Python.

- ``fcfs``: arrival order; the most recently admitted request is preempted first.
- ``priority``: lower ``Request.priority`` values first (vLLM's convention); a
  waiting request may preempt a running one of strictly lower priority.
- ``fair``: virtual token counters per tenant (VTC): the tenant that has been
  served the fewest weighted tokens goes next, so one heavy tenant cannot
  starve the others. Prompt tokens weigh 1, generated tokens 2. Latency too:
  a less-served tenant's prompt gets a short step of its own (the fast lane),
  and while a tenant with nothing waiting is about, the others' prompt
  chunks are cut short so no step runs long (``StepShape``).
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


@dataclass(frozen=True)
class StepShape:
    """How a policy narrows one step beyond the token budget.

    ``prompt_token_cap``: at most this many prompt tokens (None: the budget decides). A lane step
    (``lane_prompt_tokens`` > 0) carries only ``lane_tenant``'s decodes and that many of its waiting
    prompts' tokens; everyone else's work waits for this one short step. ``split_decode_tenants``: these
    tenants' decodes may run half per step, the half that waited longest, when the scheduler's step-time
    estimate says that shortens the step by more than a step's fixed cost.
    """

    prompt_token_cap: int | None = None
    lane_tenant: str | None = None
    lane_prompt_tokens: int = 0
    split_decode_tenants: frozenset = frozenset()

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

    def step_shape(self, waiting: deque[Request], running: list[Request], now: float) -> StepShape | None: ...


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

    def step_shape(self, waiting: deque[Request], running: list[Request], now: float) -> StepShape | None:
        """A narrower step than the budget allows, or None (``fair`` only)."""
        return None


class PriorityFirst(FirstComeFirstServed):
    name = "priority"

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return min(waiting, key=lambda request: (request.priority, request.arrival_time))

    def choose_victim(self, running: list[Request]) -> Request:
        # Lowest priority (largest value); among equals the most recently admitted.
        return max(reversed(running), key=lambda request: request.priority)

    def may_preempt_for(self, candidate: Request, victim: Request, running: list[Request]) -> bool:
        return candidate.priority < victim.priority


# Prompt tokens per step while the fair policy protects a tenant. 128, not 512: on the H200 (Llama-3.2-1B
# shape, a light tenant beside a 67 req/s flood, 2026-12-04) the light tenant's p99 TTFT was 1.62x its
# solo value with 128 and 2.23x with 512, at 4,053 vs 5,075 output tok/s for the flood.
DEFAULT_FAIR_PROMPT_CAP = 128


class VirtualTokenCounterFairness(FirstComeFirstServed):
    name = "fair"

    def __init__(self, protected_prompt_tokens: int = DEFAULT_FAIR_PROMPT_CAP, recent_seconds: float = 2.0,
                 split_decodes: bool = False) -> None:
        """``protected_prompt_tokens``: the prompt tokens a step may carry while a tenant with nothing waiting
        is about (it arrived within ``recent_seconds`` or has requests in) and another has prompts to compute;
        ``split_decodes``: meanwhile, that other tenant's decodes may run half per step (``StepShape``). Off by
        default: on the H200 fairness run it raised the light tenant's p50 TTFT (16.2 vs 11.6 ms, see
        docs/benchmarks.md)."""
        self.counters: dict[str | None, float] = {}
        self.last_arrival: dict[str | None, float] = {}
        self.protected_prompt_tokens = protected_prompt_tokens
        self.recent_seconds = recent_seconds
        self.split_decodes = split_decodes

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return min(waiting, key=lambda request: self.counters.get(request.tenant, 0.0))

    def choose_victim(self, running: list[Request]) -> Request:
        return max(reversed(running), key=lambda request: self.counters.get(request.tenant, 0.0))

    def on_added(self, request: Request, waiting: deque[Request], running: list[Request]) -> None:
        """A tenant returning from idle starts at the least-served active tenant's counter, no lower."""
        self.last_arrival[request.tenant] = max(self.last_arrival.get(request.tenant, request.arrival_time),
                                                request.arrival_time)
        others = [other for other in [*waiting, *running] if other is not request]
        if any(other.tenant == request.tenant for other in others):
            return  # already backlogged: keeps its counter
        floor = min((self.counters.get(other.tenant, 0.0) for other in others), default=None)
        if floor is not None:
            self.counters[request.tenant] = max(self.counters.get(request.tenant, 0.0), floor)

    def may_preempt_for(self, candidate: Request, victim: Request, running: list[Request]) -> bool:
        """A tenant holding fewer running slots than the victim's tenant, and fewer than an equal share, may
        take one (the victim is recomputed later, mostly from its cached blocks).

        Without this a light tenant's request waits for one of a flooding tenant's requests to finish
        whenever the flood holds every sequence slot (or KV block). Shares settle, so tenants that are
        both backlogged stop preempting each other once each holds its share.
        """
        if candidate.tenant == victim.tenant:
            return False
        held = _slots_held(running)
        tenants = set(held) | {candidate.tenant}
        share = len(running) / len(tenants)
        mine, theirs = held.get(candidate.tenant, 0), held.get(victim.tenant, 0)
        return mine + 1 < theirs and mine + 1 <= share

    def on_scheduled(self, request: Request, num_tokens: int, is_decode: bool) -> None:
        weight = DECODE_TOKEN_WEIGHT if is_decode else PROMPT_TOKEN_WEIGHT
        self.counters[request.tenant] = self.counters.get(request.tenant, 0.0) + weight * num_tokens

    def step_shape(self, waiting: deque[Request], running: list[Request], now: float) -> StepShape | None:
        """The fast lane when a less-served tenant has prompts waiting; short chunks while a tenant is about
        that has nothing waiting and others have prompts to compute.

        A light tenant's request meets two delays under a flood: the step in flight when it arrives, and
        the step that carries its prompt. The lane makes the second as short as the tenant's own work;
        the cap keeps the first short while the light tenant is about (the tenants with prompts pending pay
        for it in throughput, and only while someone with nothing waiting is present).
        """
        waiting_tokens = _prompt_tokens_by_tenant(waiting)
        pending = dict(waiting_tokens)  # plus the rest of the chunks in progress
        for request in running:
            if request.is_prefilling:
                remaining = request.num_tokens - request.num_computed_tokens
                pending[request.tenant] = pending.get(request.tenant, 0) + remaining
        if not pending:
            return None
        protected = self._protected_tenants(waiting_tokens, running, pending, now)
        cap = self.protected_prompt_tokens if protected else None
        lane_tenant, lane_tokens = self._fast_lane(waiting_tokens, pending)
        if cap is not None and lane_tokens > cap:
            lane_tokens = cap
        if cap is None and lane_tokens == 0:
            return None
        split = frozenset()
        if protected and self.split_decodes:  # a lane tenant's decodes all run in its lane step
            split = frozenset(pending) - protected - {lane_tenant} if lane_tokens else frozenset(pending) - protected
        return StepShape(prompt_token_cap=cap, lane_tenant=lane_tenant, lane_prompt_tokens=lane_tokens,
                         split_decode_tenants=split)

    def _fast_lane(self, waiting_tokens: dict[str | None, int],
                   pending: dict[str | None, int]) -> tuple[str | None, int]:
        """A tenant served less than every tenant whose prompts are being chunked or wait gets a step of its
        own: its decodes and its waiting prompts (the others' decodes and chunks resume the step after).
        Returns the tenant and its waiting prompt tokens, or (None, 0)."""
        if len(pending) < 2:
            return None, 0
        counter = self.counters.get
        # Least served first; on a tie (a tenant back from idle is lifted to the others' counter) the one
        # with fewer prompt tokens pending, then by name, so the choice never depends on set order.
        lowest = min(pending, key=lambda tenant: (counter(tenant, 0.0), pending[tenant], str(tenant)))
        if lowest not in waiting_tokens:
            return None, 0  # the least-served tenant has nothing waiting: its chunks run in the normal order
        return lowest, waiting_tokens[lowest]

    def _protected_tenants(self, waiting_tokens: dict[str | None, int], running: list[Request],
                           pending: dict[str | None, int], now: float) -> frozenset:
        """The tenants about (requests in, or one arrived lately) with nothing waiting, while another
        tenant has prompt work pending; empty when there are none."""
        stale = [tenant for tenant, at in self.last_arrival.items() if now - at > self.recent_seconds]
        for tenant in stale:  # keeps the scan to tenants seen lately, however many users a server has had
            del self.last_arrival[tenant]
        present = {request.tenant for request in running} | set(waiting_tokens) | set(self.last_arrival)
        return frozenset(tenant for tenant in present - set(waiting_tokens) if set(pending) - {tenant})


def _slots_held(running: list[Request]) -> dict[str | None, int]:
    held: dict[str | None, int] = {}
    for request in running:
        held[request.tenant] = held.get(request.tenant, 0) + 1
    return held


def _prompt_tokens_by_tenant(waiting: deque[Request]) -> dict[str | None, int]:
    tokens: dict[str | None, int] = {}
    for request in waiting:
        tokens[request.tenant] = tokens.get(request.tenant, 0) + request.num_tokens
    return tokens


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


POLICIES = {
    "fcfs": FirstComeFirstServed,
    "priority": PriorityFirst,
    "fair": VirtualTokenCounterFairness,
    "deadline": EarliestDeadlineFirst,
}


def make_policy(name: str, fair_prompt_cap: int = DEFAULT_FAIR_PROMPT_CAP, fair_split_decodes: bool = False) -> SchedulingPolicy:
    if name not in POLICIES:
        raise ValueError(f"scheduling policy must be one of {', '.join(POLICIES)}, got {name!r}.")
    if name == "fair":
        return VirtualTokenCounterFairness(protected_prompt_tokens=fair_prompt_cap, split_decodes=fair_split_decodes)
    return POLICIES[name]()
