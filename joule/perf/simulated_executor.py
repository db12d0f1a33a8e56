"""SimulatedExecutor: the predicting side of the engine's Executor seam.

It runs nothing: it returns a synthetic token for every sampling sequence and
the step model's predicted time and energy. Tokens are a deterministic function
of (request id, position), so a run depends only on its inputs, and never an
EOS id unless ``eos_probability`` asks for early stops (then a seeded draw per
(request, position) decides).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from joule.engine.plan import StepPlan, StepResult
from joule.engine.request import SampledToken
from joule.perf.step_model import StepCost, StepModel


@dataclass(frozen=True)
class PlannedSequence:
    """What a plan asked of one request: the record the equivalence tests compare."""

    request_id: str
    num_tokens: int
    start_position: int
    samples: bool


@dataclass
class SimulatedExecutor:
    step_model: StepModel | None
    vocab_size: int
    eos_token_id: int | None = None
    eos_probability: float = 0.0
    fixed_step_seconds: float | None = None  # overrides the step model (tests, what-ifs)
    record_plans: bool = False
    plans: list[list[PlannedSequence]] = field(default_factory=list)
    # Set by the simulator when an arrival wakes an idle replica: its next step pays the profile's
    # wake_overhead_s (cleared once a step runs).
    after_idle: bool = False
    metered: bool = True  # the engine's energy ledger meters every step (what the engine does unless told not to)

    def __post_init__(self) -> None:
        if self.step_model is None and self.fixed_step_seconds is None:
            raise ValueError("SimulatedExecutor needs a step_model or fixed_step_seconds.")
        if not 0.0 <= self.eos_probability <= 1.0:
            raise ValueError(f"eos_probability must be in [0, 1], got {self.eos_probability}")
        if self.eos_probability > 0 and self.eos_token_id is None:
            raise ValueError("eos_probability > 0 needs an eos_token_id.")
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")

    def can_continue(self, launched: StepResult) -> bool:
        """The engine's decode lookahead may queue a step behind ``launched`` (``EngineCore``; the scheduler
        checks the plan's shape): simulated tokens need no sampler on the host, unlike the real executor's
        non-greedy rows."""
        return True

    def launch(self, plan: StepPlan, previous: StepResult | None = None) -> StepResult:
        """``execute``; a continuation (``previous`` given) was queued while the host still worked on the
        step before, so its host overhead overlaps the device: max(host, device) instead of their sum."""
        return self._predict(plan, queued=previous is not None)[0]

    def collect(self, launched: StepResult) -> StepResult:
        return launched

    def execute(self, plan: StepPlan) -> StepResult:
        return self._predict(plan)[0]

    def _predict(self, plan: StepPlan, queued: bool = False) -> tuple[StepResult, StepCost | None]:
        """The step's tokens and predicted cost (None with ``fixed_step_seconds``)."""
        if self.record_plans:
            self.plans.append(
                [PlannedSequence(s.request_id, s.num_tokens, s.start_position, s.samples) for s in plan.sequences]
            )
        sampled = {
            sequence.request_id: SampledToken(self.token_for(sequence.request_id, sequence.context_length))
            for sequence in plan.sequences
            if sequence.samples
        }
        after_idle, self.after_idle = self.after_idle, False
        if self.fixed_step_seconds is not None:
            return StepResult(sampled=sampled, elapsed_seconds=self.fixed_step_seconds, energy_joules=0.0), None
        finished = {sequence.request_id for sequence in plan.sequences
                    if sequence.samples and finishes_with(sequence.request, sampled[sequence.request_id].token_id)}
        cost = self.step_model.predict_plan(plan, finished, after_idle, queued, self.metered)
        return StepResult(sampled=sampled, elapsed_seconds=cost.elapsed_seconds, energy_joules=cost.energy_joules), cost

    def token_for(self, request_id: str, position: int) -> int:
        digest = zlib.crc32(f"{request_id}:{position}".encode())
        if self.eos_probability > 0 and (digest % 1_000_003) / 1_000_003 < self.eos_probability:
            return self.eos_token_id
        token = (digest >> 7) % self.vocab_size
        if token == self.eos_token_id:
            token = (token + 1) % self.vocab_size
        return token


def finishes_with(request, token_id: int) -> bool:
    """Whether sampling ``token_id`` next finishes ``request`` (the scheduler's stop rule), so the step
    model can charge its release."""
    return request.stop_after(token_id, request.num_output_tokens + 1) is not None
