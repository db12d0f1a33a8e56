"""Scheduling policies: priority preemption and per-tenant fairness, on the real scheduler."""

from __future__ import annotations

import pytest
from helpers.fake_executor import CheckedEngine, RequestSpec, reference_results
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joule.engine.core import EngineCore
from joule.engine.kv_blocks import KVBlockManager
from joule.engine.plan import StepResult
from joule.engine.policies import StepShape, make_policy
from joule.engine.request import Request, RequestStatus, SampledToken
from joule.engine.scheduler_config import SchedulerConfig
from joule.engine.step_time import StepTimeCoefficients
from joule.sampling_params import SamplingParams


class TokenPerRequestExecutor:
    """A token that depends only on the request's own history, so scheduling never changes outputs."""

    def execute(self, plan):
        sampled = {}
        for sequence in plan.sequences:
            if sequence.samples:
                request = sequence.request
                sampled[request.request_id] = SampledToken(10 + hash((request.request_id, request.num_tokens)) % 90)
        return StepResult(sampled=sampled)


def _engine(policy: str, max_num_seqs: int = 2, num_blocks: int = 64) -> EngineCore:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64, max_model_len=256, policy=policy)
    return EngineCore(config, KVBlockManager(num_blocks, 4), TokenPerRequestExecutor(), clock=lambda: 0.0)


def _request(request_id: str, priority: int = 0, tenant: str | None = None, max_tokens: int = 6) -> Request:
    return Request(request_id, [1, 2, 3, 4, 5], SamplingParams(max_tokens=max_tokens, ignore_eos=True), max_tokens,
                   priority=priority, tenant=tenant, arrival_time=0.0)


def _run(engine: EngineCore, max_steps: int = 500) -> list[str]:
    """Step to the end; returns request ids in the order they finished."""
    finished = []
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return finished
        finished.extend(r.request_id for r in engine.step() if r.is_finished)
    raise AssertionError("engine did not finish")


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="fcfs"):
        SchedulerConfig(policy="random")
    with pytest.raises(ValueError, match="priority"):
        make_policy("lifo")


def test_priority_admits_the_most_urgent_first():
    engine = _engine("priority", max_num_seqs=1)
    for request_id, priority in [("low", 5), ("mid", 1), ("high", 0)]:
        engine.add_request(_request(request_id, priority))
    assert _run(engine) == ["high", "mid", "low"]


def test_priority_preempts_a_running_lower_priority_request_and_outputs_do_not_change():
    solo = _engine("fcfs", max_num_seqs=1)
    background, urgent = _request("background", priority=3, max_tokens=20), _request("urgent", priority=0)
    solo.add_request(background)
    _run(solo)
    solo_tokens = list(background.output_token_ids)

    engine = _engine("priority", max_num_seqs=1)
    background = _request("background", priority=3, max_tokens=20)
    engine.add_request(background)
    for _ in range(4):
        engine.step()
    assert background.status == RequestStatus.RUNNING and background.num_output_tokens > 0
    engine.add_request(urgent)
    engine.step()
    assert urgent.status == RequestStatus.RUNNING
    assert background.status == RequestStatus.PREEMPTED and background.num_preemptions == 1
    assert _run(engine) == ["urgent", "background"]
    assert background.output_token_ids == solo_tokens
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_equal_priority_never_preempts():
    engine = _engine("priority", max_num_seqs=1)
    first = _request("first", priority=1, max_tokens=10)
    engine.add_request(first)
    engine.step()
    engine.add_request(_request("second", priority=1))
    engine.step()
    assert first.status == RequestStatus.RUNNING and first.num_preemptions == 0


def _first_token_steps(policy: str) -> dict[str, int]:
    engine = _engine(policy, max_num_seqs=2, num_blocks=256)
    for index in range(12):
        engine.add_request(_request(f"heavy-{index}", tenant="heavy", max_tokens=8))
    engine.step()
    for index in range(2):
        engine.add_request(_request(f"light-{index}", tenant="light", max_tokens=8))
    first_token: dict[str, int] = {}
    step = 1
    while engine.has_unfinished_requests():
        for request in engine.step():
            if request.num_output_tokens and request.request_id not in first_token:
                first_token[request.request_id] = step
        step += 1
    return first_token


def test_fair_policy_serves_a_light_tenant_while_a_heavy_one_floods():
    fair = _first_token_steps("fair")
    fcfs = _first_token_steps("fcfs")
    light_fair = max(fair["light-0"], fair["light-1"])
    light_fcfs = max(fcfs["light-0"], fcfs["light-1"])
    assert light_fair < light_fcfs / 3
    # The light tenant is not starved, and the heavy tenant still finishes everything.
    assert all(f"heavy-{index}" in fair for index in range(12))


def test_fair_counters_charge_decode_tokens_double():
    policy = make_policy("fair")
    request = _request("a", tenant="t")
    policy.on_scheduled(request, 5, is_decode=False)
    policy.on_scheduled(request, 1, is_decode=True)
    assert policy.counters["t"] == 5 + 2


def test_returning_tenant_does_not_bank_credit_while_idle():
    engine = _engine("fair", max_num_seqs=1, num_blocks=256)
    for index in range(4):
        engine.add_request(_request(f"busy-{index}", tenant="busy"))
    for _ in range(20):
        engine.step()
    engine.add_request(_request("late", tenant="late"))
    counters = engine.scheduler.policy.counters
    assert counters["late"] == pytest.approx(counters["busy"])


def test_fair_fast_lane_gives_a_less_served_tenant_a_short_step():
    """A heavy tenant's long prompt is being chunked; a light tenant's prompt arrives. The next step
    carries the light tenant's work only; the heavy decodes and chunks resume the step after."""
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=512, policy="fair")
    engine = EngineCore(config, KVBlockManager(256, 4), TokenPerRequestExecutor(), clock=lambda: 0.0)
    engine.add_request(Request("heavy-decoding", [1] * 8, SamplingParams(max_tokens=50, ignore_eos=True), 50,
                               tenant="heavy"))
    engine.step()  # its prompt; it decodes from now on
    engine.add_request(Request("heavy-long", [2] * 200, SamplingParams(max_tokens=4, ignore_eos=True), 4,
                               tenant="heavy"))
    engine.step()  # the long prompt's first chunk: heavy is now mid-prefill and well served
    engine.add_request(Request("light", [3] * 6, SamplingParams(max_tokens=4, ignore_eos=True), 4, tenant="light"))
    plan = engine.scheduler.schedule()
    ids = {sequence.request_id: sequence.num_tokens for sequence in plan.sequences}
    assert ids == {"light": 6}  # no heavy decode or chunk in this step
    engine.scheduler.update(plan, TokenPerRequestExecutor().execute(plan))
    following = {sequence.request_id for sequence in engine.scheduler.schedule().sequences}
    assert {"heavy-long", "heavy-decoding", "light"} <= following  # everyone resumes


def _flood_with_one_light_decoder(clock: list[float]) -> EngineCore:
    """Budget 256, fair cap 32: a heavy tenant with long prompts waiting; a light tenant decoding."""
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, policy="fair")
    engine = EngineCore(config, KVBlockManager(1024, 4), TokenPerRequestExecutor(), clock=lambda: clock[0])
    engine.scheduler.policy.protected_prompt_tokens = 32
    engine.add_request(Request("light", [3] * 6, SamplingParams(max_tokens=100, ignore_eos=True), 100,
                               tenant="light", arrival_time=0.0))
    engine.step()
    for index in range(3):
        engine.add_request(Request(f"heavy-{index}", [2] * 300, SamplingParams(max_tokens=4, ignore_eos=True), 4,
                                   tenant="heavy", arrival_time=0.0))
    return engine


def test_fair_cuts_prompt_chunks_short_while_a_tenant_below_its_share_is_about():
    clock = [0.0]
    engine = _flood_with_one_light_decoder(clock)
    for _ in range(4):
        plan = engine.scheduler.schedule(now=clock[0])
        prompt_tokens, decode_tokens = plan.token_counts()
        assert prompt_tokens <= 32 and decode_tokens == 1  # the light decode, then at most the cap
        engine.scheduler.update(plan, TokenPerRequestExecutor().execute(plan))


def test_fair_uses_the_whole_budget_once_the_light_tenant_has_gone():
    clock = [0.0]
    engine = _flood_with_one_light_decoder(clock)
    engine.abort_request("light")
    clock[0] = 10.0  # long past the light tenant's last arrival
    prompt_tokens, _ = engine.scheduler.schedule(now=clock[0]).token_counts()
    assert prompt_tokens == 256


def test_fair_fast_lane_falls_back_to_a_normal_step_when_its_prompt_cannot_start():
    """The light prompt cannot be admitted (no slot, and the light tenant already holds its share): the step
    must not idle the others' decodes waiting for it."""
    config = SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=64, max_model_len=256, policy="fair")
    engine = EngineCore(config, KVBlockManager(256, 4), TokenPerRequestExecutor(), clock=lambda: 0.0)
    engine.add_request(_request("light-0", tenant="light", max_tokens=50))
    engine.add_request(_request("heavy-0", tenant="heavy", max_tokens=50))
    engine.step()
    engine.scheduler.policy.counters = {"light": 0.0, "heavy": 1000.0}
    engine.add_request(_request("light-1", tenant="light"))
    plan = engine.scheduler.schedule()
    assert {sequence.request_id for sequence in plan.sequences} == {"light-0", "heavy-0"}


def test_fair_fast_lane_stays_shut_when_nobody_is_behind():
    policy = make_policy("fair", fair_keep_up=False)  # keeping up, lanes also finish short prompts (test_fair_keep_up)
    waiting_same_tenant = [_request("a", tenant="t")]
    assert policy.step_shape(waiting_same_tenant, [], now=0.0) is None  # one tenant: nobody to favour
    assert policy.step_shape([], [_request("b", tenant="u")], now=0.0) is None
    policy.counters = {"light": 10.0, "heavy": 500.0}
    waiting = [_request("l", tenant="light"), _request("h", tenant="heavy")]
    light_lane = StepShape(lane_tenant="light", lane_prompt_tokens=5)
    assert policy.step_shape(waiting, [], now=0.0) == light_lane  # the light prompt's tokens
    policy.counters = {"light": 900.0, "heavy": 500.0}
    assert policy.step_shape(waiting, [], now=0.0) == StepShape(lane_tenant="heavy", lane_prompt_tokens=5)  # heavy behind
    policy.counters = {"light": 500.0, "heavy": 500.0}  # a tie (light just lifted): the smaller demand goes
    more_heavy = waiting + [_request("h2", tenant="heavy")]
    assert policy.step_shape(more_heavy, [], now=0.0) == light_lane


def test_fair_preempts_a_flooding_tenant_for_a_tenant_without_a_slot_and_outputs_do_not_change():
    solo = _engine("fcfs", max_num_seqs=1)
    reference = _request("heavy-1", tenant="heavy", max_tokens=20)
    solo.add_request(reference)
    _run(solo)

    engine = _engine("fair", max_num_seqs=2)
    heavy = [_request(f"heavy-{index}", tenant="heavy", max_tokens=20) for index in range(2)]
    for request in heavy:
        engine.add_request(request)
    for _ in range(3):
        engine.step()
    assert all(request.status == RequestStatus.RUNNING for request in heavy)
    light = _request("light-0", tenant="light")
    engine.add_request(light)
    engine.step()
    assert light.status == RequestStatus.RUNNING
    # The most recently admitted request of the tenant holding every slot made room, and is recomputed.
    assert heavy[1].status == RequestStatus.PREEMPTED and heavy[0].status == RequestStatus.RUNNING
    _run(engine)
    assert heavy[1].output_token_ids == reference.output_token_ids
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_fair_tenants_holding_their_share_do_not_preempt_each_other():
    engine = _engine("fair", max_num_seqs=2)
    first, second = _request("a-0", tenant="a", max_tokens=30), _request("b-0", tenant="b", max_tokens=30)
    engine.add_request(first)
    engine.add_request(second)
    engine.step()
    for index in range(1, 4):
        engine.add_request(_request(f"a-{index}", tenant="a"))
        engine.add_request(_request(f"b-{index}", tenant="b"))
    for _ in range(10):
        engine.step()
    assert first.num_preemptions == 0 and second.num_preemptions == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=st.lists(st.tuples(st.sampled_from(["light", "heavy", "other"]), st.integers(1, 40), st.integers(1, 12),
                             st.integers(0, 6)), min_size=1, max_size=14),
    extra_blocks=st.integers(0, 12),
    budget=st.integers(4, 48),
    max_num_seqs=st.integers(1, 6),
    keep_up=st.booleans(),
)
def test_fair_lanes_and_caps_never_change_outputs_or_strand_a_request(specs, extra_blocks, budget, max_num_seqs,
                                                                      keep_up):
    """Tenants arriving at random steps under tight blocks, budgets and slots: every request finishes with the
    outputs it would have alone, no block leaks, and the checked engine's invariants hold every step."""
    requests = [RequestSpec(f"{tenant}-{index}", [2 + index % 5] * prompt, max_tokens, with_eos=index % 3 == 0,
                            tenant=tenant) for index, (tenant, prompt, max_tokens, _) in enumerate(specs)]
    longest = max(len(spec.prompt) + spec.max_tokens for spec in requests)
    clock = [0.0]
    engine = CheckedEngine(num_blocks=-(-longest // 4) + extra_blocks, block_size=4, max_num_seqs=max_num_seqs,
                           max_num_batched_tokens=budget, max_model_len=longest, policy="fair",
                           clock=lambda: clock[0])
    engine.scheduler.policy.protected_prompt_tokens = 3
    # Decodes cost much more than a step's fixed time: the flooding tenants' decodes split whenever they may.
    engine.scheduler.step_time.prior = StepTimeCoefficients(1e-4, 1e-5, 1e-3)
    engine.scheduler.policy.split_decodes = True
    # --fair-keep-up: lanes that finish short prompts in progress, and a measured prompt cost that widens the cap.
    engine.scheduler.policy.keep_up = keep_up
    engine.scheduler.policy.seconds_per_prompt_token = 1e-5 if keep_up else None
    arrivals = sorted(zip((delay for *_, delay in specs), range(len(requests))))
    step = 0
    while arrivals or engine.core.has_unfinished_requests():
        while arrivals and arrivals[0][0] <= step:
            engine.add(requests[arrivals.pop(0)[1]])
        if engine.core.has_unfinished_requests():
            engine.step()
        step += 1
        clock[0] += 0.5
        assert step < 20_000, "the engine stopped making progress"
    engine.check_all_free()
    assert engine.results() == reference_results(requests)


def test_fair_forgets_arrival_times_once_they_are_past_the_recent_window():
    policy = make_policy("fair")
    for index in range(100):
        policy.on_added(Request(f"r{index}", [1, 2], SamplingParams(max_tokens=2), 2, tenant=f"user-{index}",
                                arrival_time=float(index)), [], [])
    waiting = [Request("w", [1, 2, 3], SamplingParams(max_tokens=2), 2, tenant="user-99", arrival_time=99.0)]
    policy.step_shape(waiting, [], now=100.0)
    assert set(policy.last_arrival) == {"user-98", "user-99"}  # within recent_seconds (2 s) of now


def _heavy_decoders_beside_a_light_one(coefficients: StepTimeCoefficients) -> EngineCore:
    """A light tenant decoding; a heavy one with four decodes and a long prompt waiting."""
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256, max_model_len=1024, policy="fair")
    engine = EngineCore(config, KVBlockManager(1024, 4), TokenPerRequestExecutor(), clock=lambda: 0.0)
    engine.scheduler.step_time.prior = coefficients
    engine.scheduler.policy.split_decodes = True
    for index in range(4):
        engine.add_request(Request(f"heavy-{index}", [2] * 4, SamplingParams(max_tokens=50, ignore_eos=True), 50,
                                   tenant="heavy", arrival_time=0.0))
    engine.add_request(Request("light", [3] * 4, SamplingParams(max_tokens=50, ignore_eos=True), 50,
                               tenant="light", arrival_time=0.0))
    while any(request.is_prefilling for request in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # the light lane step, then the heavy prompts: five decoders
    engine.add_request(Request("heavy-long", [2] * 600, SamplingParams(max_tokens=4, ignore_eos=True), 4,
                               tenant="heavy", arrival_time=0.0))
    return engine


def _decoding_ids(plan) -> set[str]:
    return {sequence.request_id for sequence in plan.sequences if sequence.num_tokens == 1}


def test_fair_splits_a_flooding_tenants_decodes_in_halves_that_take_turns_while_another_is_protected():
    engine = _heavy_decoders_beside_a_light_one(StepTimeCoefficients(1e-4, 1e-5, 1e-3))  # decodes cost most
    first = engine.scheduler.schedule(now=0.0)
    engine.scheduler.update(first, TokenPerRequestExecutor().execute(first))
    second = engine.scheduler.schedule(now=0.0)
    heavy = {f"heavy-{index}" for index in range(4)}
    assert "light" in _decoding_ids(first) and "light" in _decoding_ids(second)  # the protected tenant: every step
    assert len(_decoding_ids(first) & heavy) == 2 and len(_decoding_ids(second) & heavy) == 2
    assert (_decoding_ids(first) | _decoding_ids(second)) & heavy == heavy  # the halves take turns


def test_fair_keeps_a_decode_batch_whole_when_halving_it_would_not_pay_for_the_extra_step():
    engine = _heavy_decoders_beside_a_light_one(StepTimeCoefficients(5e-3, 1e-5, 1e-4))  # weight-bound decodes
    plan = engine.scheduler.schedule(now=0.0)
    assert _decoding_ids(plan) == {"light", *(f"heavy-{index}" for index in range(4))}


def test_the_fair_prompt_cap_is_an_engine_option_and_must_be_positive():
    from joule.config import EngineConfig

    engine = EngineCore(SchedulerConfig(policy="fair", fair_prompt_cap=128), KVBlockManager(64, 4),
                        TokenPerRequestExecutor())
    assert engine.scheduler.policy.protected_prompt_tokens == 128
    assert not engine.scheduler.policy.split_decodes  # off unless asked for
    with pytest.raises(ValueError, match="fair_prompt_cap"):
        EngineConfig(fair_prompt_cap=0)


def test_decode_halving_is_an_engine_option_down_to_the_policy():
    from joule.cli import _build_parser
    from joule.cli_args import engine_config_from_args
    from joule.config import EngineConfig

    engine = EngineCore(SchedulerConfig(policy="fair", fair_split_decodes=True), KVBlockManager(64, 4),
                        TokenPerRequestExecutor())
    assert engine.scheduler.policy.split_decodes
    args = _build_parser().parse_args(["serve", "--scheduling-policy", "fair", "--fair-split-decodes"])
    assert engine_config_from_args(args).fair_split_decodes is True
    with pytest.raises(ValueError, match="fair_split_decodes"):
        EngineConfig(fair_split_decodes="yes")
