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


def run_fixed_time_engine(scheduler_config, num_blocks: int, block_size: int, requests, step_seconds: float,
                          lookahead: bool = False, slo=None):
    """The real ``EngineCore`` driven as a server drives it, on a clock that advances ``step_seconds`` a step that
    ran something: requests that have arrived are added between steps, an idle engine waits for the next arrival.
    Returns every step's plan and each request's first-token time."""
    from joule.engine.core import EngineCore
    from joule.engine.kv_blocks import KVBlockManager
    from joule.engine.request import Request
    from joule.sampling_params import SamplingParams

    model = FixedTimeModel(step_seconds)
    clock = [0.0]
    core = EngineCore(scheduler_config, KVBlockManager(num_blocks, block_size), model, clock=lambda: clock[0],
                      decode_lookahead=lookahead)
    pending = sorted(requests, key=lambda timed: timed.arrival_time)
    first_token: dict[str, float] = {}
    index = 0
    while index < len(pending) or core.has_unfinished_requests():
        while index < len(pending) and pending[index].arrival_time <= clock[0]:
            timed = pending[index]
            index += 1
            params = SamplingParams(max_tokens=timed.request.output_len, ignore_eos=True, temperature=0.0)
            core.add_request(Request(timed.request_id, timed.request.prompt_token_ids, params,
                                     timed.request.output_len, arrival_time=timed.arrival_time, slo=slo,
                                     tenant=getattr(timed, "tenant", None)))
        if not core.has_unfinished_requests():
            clock[0] = pending[index].arrival_time
            continue
        progressed = core.step()
        stats = core.last_step
        if stats.num_sequences:
            clock[0] += step_seconds
        elif not stats.preempted_request_ids:
            raise AssertionError("the engine stalled with requests it can never schedule")
        for request in progressed:
            if request.num_output_tokens >= 1 and request.request_id not in first_token:
                first_token[request.request_id] = clock[0]
    return model.plans, first_token
