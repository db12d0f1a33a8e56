"""The ``fair`` policy: virtual token counters per tenant (VTC), with latency protection for light tenants.

The tenant that has been served the fewest weighted tokens goes next (prompt tokens weigh 1, generated tokens 2),
so one heavy tenant cannot starve the others. Latency too: a less-served tenant's prompt gets a short step of its
own (the fast lane), and while a tenant with nothing waiting is about, the others' prompt chunks are cut short so
no step runs long when that tenant's next request arrives (``StepShape.prompt_token_cap``).

By default (``keep_up``, ``--fair-keep-up``) the cut is work-conserving, as VTC is: never shorter than what the
others' prompt work needs to keep up (the prompt tokens they sent over the last ``recent_seconds`` plus those
pending, per second), at the cost a step pays per prompt token, measured from executed steps (their time beyond the
step-time estimate for their decodes alone). The fixed cap holds before that cost is known and in a flood, so a flood
waits, not the light tenant: when no step size could keep up, when only steps wider than the token budget could,
or when one of the others' requests has waited over ``FLOOD_WAIT_SECONDS`` without a token.
With the fixed cap alone (``--no-fair-keep-up``, the default until 2026-12-05), a heavy tenant that fcfs serves at
tens of milliseconds waited 2.2 / 11.5 s on an H200 at 20 / 40 req/s; keeping up, 0.14 / 0.12 s, while the light
tenant's p99 TTFT went from 1.30x / 1.76x solo to 1.50x / 2.41x (measured, docs/benchmarks.md). Demand is read
per tenant over the time since its earliest arrival in the window, so a flood is known as one from its start.
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

# Prompt throughput the cut leaves the other tenants, as a multiple of their demand.
KEEP_UP_MARGIN = 1.25
# Steps with at least this many prompt tokens teach the per-token cost; each new sample weighs this much.
MIN_PROMPT_TOKENS_OBSERVED = 64
PROMPT_COST_WEIGHT = 0.1
MIN_DEMAND_SPAN = 0.25  # seconds: the shortest time a demand rate is taken over
# A request of the others not yet started after this long means they are not kept up with: a flood. (Kept up
# with, their TTFTs were tens of milliseconds in simulation and on the H200; a flood's grow by seconds a second.)
FLOOD_WAIT_SECONDS = 1.0


class VirtualTokenCounterFairness(FirstComeFirstServed):
    name = "fair"

    def __init__(self, protected_prompt_tokens: int = DEFAULT_FAIR_PROMPT_CAP, recent_seconds: float = 2.0,
                 split_decodes: bool = False, keep_up: bool = True, step_token_budget: int | None = None) -> None:
        """``protected_prompt_tokens``: the prompt tokens a step may carry while a tenant with nothing waiting
        is about (it arrived within ``recent_seconds`` or has requests in) and another has prompts to compute;
        ``split_decodes``: meanwhile, that other tenant's decodes may run half per step (``StepShape``). Off by
        default: on the H200 fairness run it raised the light tenant's p50 TTFT (16.2 vs 11.6 ms, see
        docs/benchmarks.md). ``keep_up``: the cap never below what the others need to keep up (module doc);
        ``step_token_budget``: the most tokens a step may carry (the scheduler's ``max_num_batched_tokens``): a
        demand that needs wider steps than that cannot be kept up with."""
        self.counters: dict[str | None, float] = {}
        self.last_arrival: dict[str | None, float] = {}
        # (arrival time, prompt tokens) of each tenant's requests within ``recent_seconds``: their demand.
        self.recent_prompts: dict[str | None, deque[tuple[float, int]]] = {}
        self.seconds_per_prompt_token: float | None = None  # measured (``observe_step``)
        self.prompt_cost_line = _DecayingLine(PROMPT_COST_WEIGHT)
        self.protected_prompt_tokens = protected_prompt_tokens
        self.recent_seconds = recent_seconds
        self.split_decodes = split_decodes
        self.keep_up = keep_up
        self.step_token_budget = step_token_budget

    def next_waiting(self, waiting: deque[Request]) -> Request:
        return min(waiting, key=lambda request: self.counters.get(request.tenant, 0.0))

    def choose_victim(self, running: list[Request]) -> Request:
        return max(reversed(running), key=lambda request: self.counters.get(request.tenant, 0.0))

    def on_added(self, request: Request, waiting: deque[Request], running: list[Request]) -> None:
        """A tenant returning from idle starts at the least-served active tenant's counter, no lower."""
        self.last_arrival[request.tenant] = max(self.last_arrival.get(request.tenant, request.arrival_time),
                                                request.arrival_time)
        if self.keep_up:
            self.recent_prompts.setdefault(request.tenant, deque()).append(
                (request.arrival_time, request.num_prompt_tokens))
            # Bounded by what one tenant sends in the window, however long a server runs.
            self._recent_arrivals(request.tenant, request.arrival_time - self.recent_seconds)
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

    def observe_step(self, num_prefill_tokens: int, num_decode_tokens: int, elapsed_seconds: float,
                     step_time: StepTimeEstimator) -> None:
        """What prompt tokens cost: a step's time beyond what the estimate gives its decodes alone, as a line
        ``overhead + cost x tokens`` fitted over recent steps (``prompt_cost_line``, which the cap uses: a step that
        carries a chunk pays a fixed part too, so a token of a 2,048-token chunk costs less than one of a 128-token
        chunk), and per prompt token as a moving average (``seconds_per_prompt_token``: None until a step has
        taught the cost). Measured, not taken from the estimate's own per-token term, which cannot be told apart
        from the rest once every step carries the same capped chunk."""
        coefficients = step_time.coefficients()
        if num_prefill_tokens < MIN_PROMPT_TOKENS_OBSERVED or coefficients is None or elapsed_seconds <= 0:
            return
        excess = max(0.0, elapsed_seconds - coefficients.predict(0, num_decode_tokens))
        sample, previous = excess / num_prefill_tokens, self.seconds_per_prompt_token
        self.seconds_per_prompt_token = sample if previous is None else (
            previous + PROMPT_COST_WEIGHT * (sample - previous))
        self.prompt_cost_line.add(num_prefill_tokens, excess)

    def step_shape(self, waiting: deque[Request], running: list[Request], now: float,
                   step_time: StepTimeEstimator | None = None) -> StepShape | None:
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
        cap = None
        if protected:
            # The others' oldest request still without its first token (waiting, or its prompt in progress; not one
            # preempted after it had some, which waits again for reasons of its own).
            unstarted = [*waiting, *(request for request in running if request.is_prefilling)]
            oldest = min((request.arrival_time for request in unstarted
                          if request.tenant not in protected and request.num_output_tokens == 0), default=None)
            cap = self._protecting_cap(protected, pending, running, now, step_time, oldest)
        lane_tenant, lane_tokens = self._fast_lane(waiting_tokens, pending)
        if cap is not None and lane_tokens > cap:
            lane_tokens = cap
        if cap is None and lane_tokens == 0:
            return None
        split = frozenset()
        if protected and self.split_decodes:  # a lane tenant's decodes all run in its lane step
            split = frozenset(pending) - protected - {lane_tenant} if lane_tokens else frozenset(pending) - protected
        return StepShape(prompt_token_cap=cap, lane_tenant=lane_tenant, lane_prompt_tokens=lane_tokens,
                         split_decode_tenants=split, lane_finishes_prompts=self.keep_up)

    def _protecting_cap(self, protected: frozenset, pending: dict[str | None, int], running: list[Request],
                        now: float, step_time: StepTimeEstimator | None, oldest_unstarted: float | None = None) -> int:
        """Prompt tokens a step may carry while ``protected`` tenants are about: the fixed cap, or more where the
        others' prompt work needs more to keep up.

        A step carrying ``c`` prompt tokens takes ``base + overhead + cost x c`` (``base``: the estimate for its
        decodes alone; ``overhead`` and ``cost``: the prompt cost line measured from executed steps), so the others
        keep up with a demand of ``D`` tokens a second when ``c >= D x (base + overhead) / (1 - D x cost)``. ``D``
        is, per tenant, what it sent over the last ``recent_seconds`` plus what is still pending, over the time
        since its earliest arrival in that window (at least ``MIN_DEMAND_SPAN``), summed, times
        ``KEEP_UP_MARGIN``. It is a flood, and the fixed cap holds (a flood waits, not the light tenant), where no
        ``c`` keeps up, where only one wider than the token budget does, or where the others' oldest request
        still without a token (``oldest_unstarted``, its arrival) has waited over ``FLOOD_WAIT_SECONDS``: the
        estimate leaves out that wider steps also keep more decodes in flight, so near capacity it can promise
        more than a GPU does.
        """
        coefficients = step_time.coefficients() if step_time is not None and self.keep_up else None
        if coefficients is None or self.seconds_per_prompt_token is None:
            return self.protected_prompt_tokens
        if oldest_unstarted is not None and now - oldest_unstarted > FLOOD_WAIT_SECONDS:
            return self.protected_prompt_tokens  # keeping up has failed, whatever the estimate says
        horizon = now - self.recent_seconds
        demand = 0.0
        for tenant in set(pending) - protected:
            arrivals = self._recent_arrivals(tenant, horizon)
            sent = sum(tokens for _, tokens in arrivals) + pending[tenant]
            # Over the time since the tenant's earliest arrival in the window, not the whole window: a flood that
            # began half a second ago would read as a quarter of itself, and its first seconds run uncapped.
            since = arrivals[0][0] if arrivals else horizon
            demand += KEEP_UP_MARGIN * sent / min(self.recent_seconds, max(now - since, MIN_DEMAND_SPAN))
        cost, overhead = self.prompt_cost_line.slope_and_intercept() or (self.seconds_per_prompt_token, 0.0)
        room = 1.0 - demand * cost
        if room <= 0:
            return self.protected_prompt_tokens  # no step size keeps up
        decodes = sum(1 for request in running if not request.is_prefilling)
        needed = math.ceil(demand * (coefficients.predict(0, decodes) + overhead) / room)
        if self.step_token_budget is not None and needed > self.step_token_budget - decodes:
            return self.protected_prompt_tokens  # keeping up needs steps wider than the budget allows
        return max(self.protected_prompt_tokens, needed)

    def _recent_arrivals(self, tenant: str | None, horizon: float) -> deque[tuple[float, int]]:
        """(arrival time, prompt tokens) of ``tenant``'s requests since ``horizon``; older ones are dropped."""
        arrivals = self.recent_prompts.get(tenant, deque())
        while arrivals and arrivals[0][0] < horizon:
            arrivals.popleft()
        return arrivals

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
        if lowest in waiting_tokens:
            return lowest, pending[lowest] if self.keep_up else waiting_tokens[lowest]
        if self.keep_up:
            # The cap may be wide: a short prompt in progress (the rest of one a lane step cut) is finished in a
            # lane of its own, or it would wait behind the others' chunks, however less served they are.
            short = [tenant for tenant in pending if pending[tenant] <= self.protected_prompt_tokens]
            if short:
                finishing = min(short, key=lambda tenant: (pending[tenant], str(tenant)))
                return finishing, pending[finishing]
        return None, 0  # the least-served tenant has nothing waiting: its chunks run in the normal order

    def _protected_tenants(self, waiting_tokens: dict[str | None, int], running: list[Request],
                           pending: dict[str | None, int], now: float) -> frozenset:
        """The tenants about (requests in, or one arrived lately) with nothing waiting, while another
        tenant has prompt work pending; empty when there are none."""
        stale = [tenant for tenant, at in self.last_arrival.items() if now - at > self.recent_seconds]
        for tenant in stale:  # keeps the scan to tenants seen lately, however many users a server has had
            del self.last_arrival[tenant]
        present = {request.tenant for request in running} | set(waiting_tokens) | set(self.last_arrival)
        return frozenset(tenant for tenant in present - set(waiting_tokens) if set(pending) - {tenant})


class _DecayingLine:
    """A least-squares line ``y = intercept + slope x x`` over samples whose weight decays by ``1 - weight`` at
    each new one (an exponential moving fit). Through zero while the samples' x are too alike to tell apart."""

    def __init__(self, weight: float) -> None:
        self.keep = 1.0 - weight
        self.sums = [0.0] * 5  # weights, x, x*x, y, x*y

    def add(self, x: float, y: float) -> None:
        self.sums = [self.keep * total + value for total, value in zip(self.sums, (1.0, x, x * x, y, x * y))]

    def slope_and_intercept(self) -> tuple[float, float] | None:
        """(slope, intercept), or None before any sample."""
        weights, x, xx, y, xy = self.sums
        if x <= 0:
            return None
        spread = weights * xx - x * x  # weights^2 x the variance of x
        if spread > 0.01 * weights * xx:  # x varies by more than ~10 % of its scale
            slope = (weights * xy - x * y) / spread
            intercept = (y - slope * x) / weights
            if slope > 0 and intercept >= 0:
                return slope, intercept
        return y / x, 0.0  # through zero


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
