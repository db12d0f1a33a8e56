"""The ``fair`` policy: virtual token counters per tenant (VTC), with latency protection for light tenants.

The tenant that has been served the fewest weighted tokens goes next (prompt tokens weigh 1, generated tokens 2),
so one heavy tenant cannot starve the others. Latency too: a less-served tenant's prompt gets a short step of its
own (the fast lane), and while a tenant with nothing waiting is about, the others' prompt chunks are cut short so
no step runs long when that tenant's next request arrives (``StepShape.prompt_token_cap``).

The cut is work-conserving: it is never shorter than what the others' prompt work needs to keep up (their prompt
tokens arriving per second, plus their backlog spread over the same window, at the scheduler's step-time
estimate). Only when even whole-budget steps could not keep up (a flood) does the fixed cap hold, so the flood
waits, not the light tenant. Without this, a heavy tenant that fcfs served with 12 ms TTFT waited 3 s (simulated
H100, docs/benchmarks.md).
"""

from __future__ import annotations

import math
from collections import deque

from joule.engine.policies import (
    DECODE_TOKEN_WEIGHT,
    DEFAULT_FAIR_PROMPT_CAP,
    PROMPT_TOKEN_WEIGHT,
    FirstComeFirstServed,
    StepShape,
)
from joule.engine.request import Request
from joule.engine.step_time import StepTimeEstimator

# Prompt throughput the cut must leave the unprotected tenants, as a multiple of their recent demand.
KEEP_UP_MARGIN = 1.25


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
