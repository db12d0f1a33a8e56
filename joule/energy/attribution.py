"""The energy ledger: every joule the meter counts goes to a request, or is reported as unattributed.

The meter is read twice per engine step (``EngineCore`` calls ``step_began`` and ``step_ended``):

* **Step energy** (from ``step_began`` to ``step_ended``: schedule, execute, update) goes to the
  requests in the plan, in proportion to the work each did (``AttributionWeights``).
* **Idle energy** (from the previous ``step_ended`` to this ``step_began``: detokenizing, the
  server loop, waiting for requests) is spread over the requests present, waiting or running, in
  proportion to how long each was present in the gap: at every instant the power is shared equally
  by the requests that had arrived. Time in the gap before any request was present is unattributed.
  An empty step (nothing could be scheduled) is idle time of the requests present.

So ``attributed + unattributed == metered`` holds exactly (up to float rounding) at every read.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable

from joule.energy.meter import EnergyMeter

_INSTANT_SECONDS = 1e-9  # gaps shorter than this are treated as instants


@dataclass(frozen=True)
class AttributionWeights:
    """How much work a sequence's share of a step is, in units of one token's dense (non-attention) work.

    A new token at position ``p`` costs 1 (its projections and MLP) plus ``(p + 1) / C`` for
    attending over ``p + 1`` keys. ``C`` is the context length at which attention work equals the
    dense work of one token: dense FLOPs per token are about ``24 d^2`` per layer (QKV, output and a
    4d-wide MLP), attention FLOPs per key about ``4 d`` per layer (QK^T and PV), so ``C ~ 6 d`` for
    hidden size ``d`` (``for_hidden_size``). A chunk of ``n`` prompt tokens from position ``s``
    therefore weighs ``n + (n s + n (n + 1) / 2) / C``, and a decode token with ``k`` keys in its KV
    cache ``1 + k / C``.
    """

    context_per_token_work: float = 4096.0

    def __post_init__(self) -> None:
        if not self.context_per_token_work > 0:
            raise ValueError(f"context_per_token_work must be positive, got {self.context_per_token_work}.")

    @classmethod
    def for_hidden_size(cls, hidden_size: int) -> "AttributionWeights":
        return cls(6.0 * hidden_size)

    def sequence_weight(self, start_position: int, num_tokens: int) -> float:
        attended_keys = num_tokens * start_position + num_tokens * (num_tokens + 1) / 2
        return num_tokens + attended_keys / self.context_per_token_work


@dataclass(frozen=True)
class EnergyTotals:
    """The ledger's books at its last meter read."""

    metered_joules: float  # the meter's count since the ledger started
    attributed_joules: float  # charged to requests (live and released)
    unattributed_joules: float  # counted while no request was present
    step_joules: float  # counted during non-empty steps
    idle_joules: float  # counted between steps and in empty steps
    source: str

    @property
    def imbalance_joules(self) -> float:
        return self.metered_joules - self.attributed_joules - self.unattributed_joules


class EnergyLedger:
    """Meters engine steps and charges requests; see the module docstring for the rules.

    ``clock`` must be the clock of request arrival times (``time.time`` in ``LLMEngine``).
    Requests' joules stay in the ledger until ``release`` (when their outputs are final), so a
    server's ledger does not grow without bound.
    """

    def __init__(
        self,
        meter: EnergyMeter,
        weights: AttributionWeights | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.meter = meter
        # A meter that estimates from the steps themselves (``StepModelEnergyEstimate``) is shown each one.
        self._observe_step = getattr(meter, "observe_step", None)
        self.weights = weights or AttributionWeights()
        self._start_reading = self._last_reading = meter.read_joules()
        self._last_time = clock()
        self._by_request: dict[str, float] = {}
        self._present: list[tuple[str, float]] = []
        self._released_joules = 0.0
        self._unattributed_joules = 0.0
        self._step_joules = 0.0
        self._idle_joules = 0.0

    @property
    def source(self) -> str:
        return self.meter.source

    # -- the engine's hooks ---------------------------------------------------------------------
    def step_began(self, now: float, requests: Iterable) -> None:
        """Close the idle gap since the last step; ``requests`` are those present now (waiting or running)."""
        self._present = [(request.request_id, request.arrival_time) for request in requests]
        joules = self._read()
        self._idle_joules += joules
        self._spread_over_gap(joules, self._last_time, now, self._present)
        self._last_time = now

    def step_ended(self, plan, now: float) -> float:
        """Charge the step's energy to the plan's sequences by weight; returns the step's joules."""
        if self._observe_step is not None:
            self._observe_step(plan, now - self._last_time)
        joules = self._read()
        # Runs for every sequence of every step: one pass for the weights, one for the charges, no calls per row.
        weigh = self.weights.sequence_weight
        weights = {}
        for sequence in plan.sequences:
            request_id = sequence.request.request_id
            weights[request_id] = weights.get(request_id, 0.0) + weigh(sequence.start_position,
                                                                        len(sequence.token_ids))
        total_weight = sum(weights.values())
        if total_weight > 0:
            self._step_joules += joules
            by_request, per_weight = self._by_request, joules / total_weight
            for request_id, weight in weights.items():
                by_request[request_id] = by_request.get(request_id, 0.0) + per_weight * weight
        else:
            self._idle_joules += joules
            self._spread_over_gap(joules, now, now, self._present)
        self._last_time = now
        return joules

    # -- queries --------------------------------------------------------------------------------
    def joules_of(self, request_id: str) -> float:
        """Joules charged so far to a request not yet released (0.0 for one never charged)."""
        return self._by_request.get(request_id, 0.0)

    def release(self, request_id: str) -> float:
        """Forget a request whose outputs are final; its joules stay in the attributed total."""
        joules = self._by_request.pop(request_id, 0.0)
        self._released_joules += joules
        return joules

    @property
    def released_joules(self) -> float:
        """Joules of the requests released so far (finished or aborted): what one release added is its cost."""
        return self._released_joules

    def totals(self) -> EnergyTotals:
        return EnergyTotals(
            metered_joules=self._last_reading - self._start_reading,
            attributed_joules=self._released_joules + sum(self._by_request.values()),
            unattributed_joules=self._unattributed_joules,
            step_joules=self._step_joules,
            idle_joules=self._idle_joules,
            source=self.meter.source,
        )

    # -- internals ------------------------------------------------------------------------------
    def _read(self) -> float:
        reading = self.meter.read_joules()
        joules = max(0.0, reading - self._last_reading)
        self._last_reading = max(reading, self._last_reading)
        return joules

    def _charge(self, request_id: str, joules: float) -> None:
        self._by_request[request_id] = self._by_request.get(request_id, 0.0) + joules

    def _spread_over_gap(self, joules: float, start: float, end: float, present: list[tuple[str, float]]) -> None:
        """Share ``joules`` over [start, end]: at each instant equally among the requests arrived by then."""
        if joules == 0.0:
            return
        if not present:
            self._unattributed_joules += joules
            return
        length = end - start
        # No measurable gap (an equal split, free of float underflow), or every request there from its start (the
        # usual case between two steps: an equal split as well, without sorting the arrivals).
        if length <= _INSTANT_SECONDS or all(arrival <= start for _, arrival in present):
            share, by_request = joules / len(present), self._by_request
            for request_id, _ in present:
                by_request[request_id] = by_request.get(request_id, 0.0) + share
            return
        arrivals = sorted((min(max(arrival, start), end), request_id) for request_id, arrival in present)
        self._unattributed_joules += joules * ((arrivals[0][0] - start) / length)
        # Segment j runs from the j-th arrival to the next and is shared by the j + 1 arrived so far;
        # a request's share is the sum over the segments from its arrival on (a suffix sum).
        share_from_here = 0.0
        shares = [0.0] * len(arrivals)
        for index in range(len(arrivals) - 1, -1, -1):
            segment_end = arrivals[index + 1][0] if index + 1 < len(arrivals) else end
            share_from_here += joules * ((segment_end - arrivals[index][0]) / length) / (index + 1)
            shares[index] = share_from_here
        for (_, request_id), share in zip(arrivals, shares):
            self._charge(request_id, share)
