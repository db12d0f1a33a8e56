"""The fair policy's keep-up mode (``--fair-keep-up``): its cap on the others' prompt chunks never below what they
need to keep up with what they send, at a per-prompt-token cost measured from executed steps."""

from __future__ import annotations

from collections import deque

import pytest

from joule.engine.core import EngineCore
from joule.engine.fair_policy import VirtualTokenCounterFairness
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.plan import StepResult
from joule.engine.request import Request, SampledToken
from joule.engine.scheduler_config import SchedulerConfig
from joule.engine.step_time import StepTimeCoefficients, StepTimeEstimator
from joule.sampling_params import SamplingParams


def _prompt(request_id: str, tenant: str, tokens: int, arrival: float, max_tokens: int = 4) -> Request:
    token = 3 if tenant == "light" else 2  # no prefix-cache hits between the tenants
    return Request(request_id, [token] * tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens,
                   tenant=tenant, arrival_time=arrival)


def _estimate(fixed: float, per_decode: float) -> StepTimeEstimator:
    return StepTimeEstimator(prior=StepTimeCoefficients(fixed, 1e-5, per_decode))


def test_the_cap_keeps_the_others_up_with_what_they_sent_and_falls_back_to_the_fixed_cap_in_a_flood():
    policy = VirtualTokenCounterFairness(protected_prompt_tokens=32, keep_up=True)
    for index in range(20):  # 40,000 prompt tokens over the last two seconds
        policy.on_added(_prompt(f"heavy-{index}", "heavy", 2000, index * 0.1), deque(), [])
    light, pending, step_time = frozenset({"light"}), {"heavy": 4000}, _estimate(2e-3, 1e-4)
    assert policy._protecting_cap(light, pending, [], 2.0, step_time) == 32  # no measured cost yet
    policy.seconds_per_prompt_token = 2e-6
    # Demand 1.25 x (40,000 + 4,000) / 2 s = 27,500 tokens/s; a step of c tokens takes 2 ms + 2 us x c, so
    # c >= 27,500 x 2 ms / (1 - 27,500 x 2 us) = 58.2.
    assert policy._protecting_cap(light, pending, [], 2.0, step_time) == 59
    policy.seconds_per_prompt_token = 4e-5  # no step size serves 27,500 tokens/s: a flood
    assert policy._protecting_cap(light, pending, [], 2.0, step_time) == 32
    policy.seconds_per_prompt_token = 2e-6
    # Arrivals older than the recent window are forgotten: only the pending tokens count.
    assert policy._protecting_cap(light, pending, [], 30.0, step_time) == 32
    assert all(not arrivals for arrivals in policy.recent_prompts.values())
    strict = VirtualTokenCounterFairness(protected_prompt_tokens=32, keep_up=False)  # the fixed cap, always
    strict.seconds_per_prompt_token = 2e-6
    assert strict._protecting_cap(light, pending, [], 2.0, step_time) == 32


def test_the_prompt_cost_is_measured_from_steps_with_many_prompt_tokens():
    policy = VirtualTokenCounterFairness(keep_up=True)
    step_time = StepTimeEstimator(prior=StepTimeCoefficients(1e-3, 0.0, 1e-4))  # its own per-token term: 0
    policy.observe_step(100, 2, 1e-3 + 2e-4 + 100 * 3e-6, step_time)
    assert policy.seconds_per_prompt_token == pytest.approx(3e-6)
    policy.observe_step(200, 2, 1e-3 + 2e-4 + 200 * 5e-6, step_time)
    assert policy.seconds_per_prompt_token == pytest.approx(3e-6 + 0.1 * 2e-6)  # a moving average
    policy.observe_step(10, 2, 1.0, step_time)  # too few prompt tokens to tell
    assert policy.seconds_per_prompt_token == pytest.approx(3.2e-6)


class TokenExecutor:
    def execute(self, plan):
        return StepResult(sampled={s.request_id: SampledToken(7) for s in plan.sequences if s.samples})


def _light_prompt_split_by_the_cap(keep_up: bool) -> list[dict[str, int]]:
    """Fair cap 32, budget 256: a heavy tenant's long prompt in progress (nothing of it waiting, so it is the
    tenant about with nothing waiting, and the cap holds); a light tenant's 40-token prompt arrives, and its lane
    step carries the first 32 tokens. Returns the next two steps' tokens per request."""
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=2048, policy="fair",
                             fair_prompt_cap=32, fair_keep_up=keep_up)
    engine = EngineCore(config, KVBlockManager(1024, 4), TokenExecutor(), clock=lambda: 0.0)
    engine.add_request(_prompt("heavy", "heavy", 600, 0.0))
    engine.step()
    engine.add_request(_prompt("light", "light", 40, 0.0))
    steps = []
    for _ in range(2):
        plan = engine.scheduler.schedule(now=0.0)
        steps.append({s.request_id: s.num_tokens for s in plan.sequences})
        engine.scheduler.update(plan, TokenExecutor().execute(plan))
    return steps


def test_keeping_up_the_lane_also_finishes_a_short_prompt_in_progress():
    """Otherwise the rest of the light prompt waits behind the heavy tenant's chunks (with a wide cap, for as
    long as those take)."""
    assert _light_prompt_split_by_the_cap(keep_up=True) == [{"light": 32}, {"light": 8}]
    # The fixed cap alone: a lane as wide as the cap does not fit the capped step; the heavy chunk goes first.
    assert _light_prompt_split_by_the_cap(keep_up=False)[0] == {"heavy": 32}


def test_keep_up_is_an_engine_option_down_to_the_policy():
    from joule.cli import _build_parser
    from joule.cli_args import engine_config_from_args
    from joule.config import EngineConfig

    engine = EngineCore(SchedulerConfig(policy="fair", fair_keep_up=True), KVBlockManager(64, 4), TokenExecutor())
    assert engine.scheduler.policy.keep_up
    assert engine.scheduler.policy.step_token_budget == SchedulerConfig().max_num_batched_tokens  # its flood test
    assert EngineCore(SchedulerConfig(policy="fair"), KVBlockManager(64, 4), TokenExecutor()).scheduler.policy.keep_up
    fixed = EngineCore(SchedulerConfig(policy="fair", fair_keep_up=False), KVBlockManager(64, 4), TokenExecutor())
    assert not fixed.scheduler.policy.keep_up
    args = _build_parser().parse_args(["serve", "--scheduling-policy", "fair"])
    assert engine_config_from_args(args).fair_keep_up is True  # the default since 2026-12-05
    args = _build_parser().parse_args(["serve", "--scheduling-policy", "fair", "--no-fair-keep-up"])
    assert engine_config_from_args(args).fair_keep_up is False
    with pytest.raises(ValueError, match="fair_keep_up"):
        EngineConfig(fair_keep_up="yes")


def test_demand_is_a_rate_over_the_time_seen_while_the_window_fills():
    """Half a second into a run, 10,000 prompt tokens are 20,000 tokens a second, not 5,000 (the two-second window
    is not full yet): read over the whole window, the start of a flood would look like a light load."""
    policy = VirtualTokenCounterFairness(protected_prompt_tokens=32, keep_up=True)
    for index in range(5):
        policy.on_added(_prompt(f"heavy-{index}", "heavy", 2000, index * 0.1), deque(), [])
    policy.seconds_per_prompt_token = 2e-5
    light, step_time = frozenset({"light"}), _estimate(2e-3, 1e-4)
    # At 0.5 s: 1.25 x 10,000 / 0.5 s = 25,000 tokens/s, kept up with by c >= 25,000 x 2 ms / (1 - 0.5) = 100.
    assert policy._protecting_cap(light, {"heavy": 0}, [], 0.5, step_time) == 100
    # The same tokens over the full window (at 2.0 s): 6,250 tokens/s, c >= 14.3: the fixed cap of 32 does.
    assert policy._protecting_cap(light, {"heavy": 0}, [], 2.0, step_time) == 32


def test_a_tenant_that_began_sending_lately_is_read_over_its_own_time_not_the_window():
    """The H100's flood of 2026-12-05: the server had run for minutes, so the heavy tenant's first half second was
    averaged over the whole two-second window, read as a quarter of itself, and ran uncapped."""
    policy = VirtualTokenCounterFairness(protected_prompt_tokens=32, keep_up=True)
    policy.on_added(_prompt("early", "light", 10, 0.0), deque(), [])  # the server has been up since 0
    for index in range(5):  # the heavy tenant starts at 100 s: 10,000 tokens in half a second
        policy.on_added(_prompt(f"heavy-{index}", "heavy", 2000, 100.0 + index * 0.1), deque(), [])
    policy.seconds_per_prompt_token = 2e-5
    light, step_time = frozenset({"light"}), _estimate(2e-3, 1e-4)
    # 1.25 x 10,000 / 0.5 s = 25,000 tokens/s: c >= 25,000 x 2 ms / (1 - 25,000 x 20 us) = 100.
    assert policy._protecting_cap(light, {"heavy": 0}, [], 100.5, step_time) == 100


def test_keeping_up_with_steps_wider_than_the_budget_is_a_flood():
    """Needing 59 prompt tokens a step (the first test's numbers) is kept up with under a budget of 64 with
    no decodes, and is a flood (the fixed cap) under a budget of 50, where the old cap was clipped to the budget
    and every step ran as long as it could while the light tenant waited behind it."""
    pending, light, step_time = {"heavy": 4000}, frozenset({"light"}), _estimate(2e-3, 1e-4)
    for budget, expected in ((64, 59), (50, 32)):
        policy = VirtualTokenCounterFairness(protected_prompt_tokens=32, keep_up=True, step_token_budget=budget)
        for index in range(20):
            policy.on_added(_prompt(f"heavy-{index}", "heavy", 2000, index * 0.1), deque(), [])
        policy.seconds_per_prompt_token = 2e-6
        assert policy._protecting_cap(light, pending, [], 2.0, step_time) == expected


def test_a_request_of_the_others_waiting_over_a_second_means_they_are_not_kept_up_with():
    policy = VirtualTokenCounterFairness(protected_prompt_tokens=32, keep_up=True)
    for index in range(20):
        policy.on_added(_prompt(f"heavy-{index}", "heavy", 2000, index * 0.1), deque(), [])
    policy.seconds_per_prompt_token = 2e-6
    light, pending, step_time = frozenset({"light"}), {"heavy": 4000}, _estimate(2e-3, 1e-4)
    assert policy._protecting_cap(light, pending, [], 2.0, step_time, oldest_unstarted=1.5) == 59
    assert policy._protecting_cap(light, pending, [], 2.0, step_time, oldest_unstarted=0.9) == 32
    # Through step_shape: the heavy tenant's oldest unstarted request is the one waiting since 0.5 s.
    waiting = deque([_prompt("heavy-old", "heavy", 2000, 0.5)])
    policy.last_arrival["light"] = 1.9
    shape = policy.step_shape(waiting, [], 2.0, step_time)
    assert shape is not None and shape.prompt_token_cap == 32


def test_the_prompt_cost_line_tells_a_steps_fixed_part_from_the_cost_per_token():
    """A 128-token chunk costs more per token than a 2,048-token one when a step with any chunk pays a fixed
    part: the line keeps the two apart, where the moving average per token reads between them."""
    policy = VirtualTokenCounterFairness(keep_up=True)
    step_time = StepTimeEstimator(prior=StepTimeCoefficients(1e-3, 0.0, 1e-4))  # its own per-token term: 0
    for tokens in (128, 2048, 128, 1024, 2048, 128, 512):
        policy.observe_step(tokens, 2, 1e-3 + 2e-4 + 1.5e-3 + tokens * 4e-6, step_time)
    cost, overhead = policy.prompt_cost_line.slope_and_intercept()
    assert cost == pytest.approx(4e-6) and overhead == pytest.approx(1.5e-3)
    # All chunks alike: nothing tells the fixed part apart, so the line goes through zero.
    alike = VirtualTokenCounterFairness(keep_up=True)
    for _ in range(4):
        alike.observe_step(128, 2, 1e-3 + 2e-4 + 128 * 5e-6, step_time)
    assert alike.prompt_cost_line.slope_and_intercept() == (pytest.approx(5e-6), 0.0)
    assert VirtualTokenCounterFairness().prompt_cost_line.slope_and_intercept() is None


def test_a_preempted_request_that_had_tokens_is_no_sign_of_a_flood():
    policy = VirtualTokenCounterFairness(protected_prompt_tokens=32, keep_up=True)
    for index in range(20):
        policy.on_added(_prompt(f"heavy-{index}", "heavy", 2000, index * 0.1), deque(), [])
    policy.seconds_per_prompt_token = 2e-6
    preempted = _prompt("heavy-preempted", "heavy", 2000, 0.5)
    preempted.output_token_ids.append(7)  # it had a token before it was preempted
    policy.last_arrival["light"] = 1.9
    shape = policy.step_shape(deque([preempted]), [], 2.0, _estimate(2e-3, 1e-4))
    assert shape is not None and shape.prompt_token_cap > 32  # kept up with, as without it
