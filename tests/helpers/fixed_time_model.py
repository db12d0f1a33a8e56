"""The real engine's stand-in for a model in simulator-equivalence tests: a fixed step time, every plan recorded."""

from __future__ import annotations

from joule.engine.plan import StepPlan, StepResult
from joule.engine.request import SampledToken
from joule.perf.simulated_executor import PlannedSequence


class FixedTimeModel:
    """Executes (or launches and collects, for the decode lookahead) a plan in ``step_seconds``; records each plan
    as the simulator's executor does (``PlannedSequence``), and returns token 7 for every sampled sequence."""

    def __init__(self, step_seconds: float):
        self.step_seconds = step_seconds
        self.plans: list[list[PlannedSequence]] = []

    def execute(self, plan: StepPlan) -> StepResult:
        self.plans.append([PlannedSequence(s.request_id, s.num_tokens, s.start_position, s.samples)
                           for s in plan.sequences])
        sampled = {s.request_id: SampledToken(7) for s in plan.sequences if s.samples}
        return StepResult(sampled=sampled, elapsed_seconds=self.step_seconds)

    def launch(self, plan: StepPlan, previous: StepResult | None = None) -> StepResult:
        return self.execute(plan)

    def can_continue(self, launched: StepResult) -> bool:
        return True

    def collect(self, launched: StepResult) -> StepResult:
        return launched
