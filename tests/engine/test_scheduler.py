"""Property tests for the token-budget scheduler, driven through EngineCore and a simulated executor.

Every step of every run is checked (see ``CheckedEngine`` in tests/helpers/fake_executor.py): the token
budget and sequence cap hold, no request is planned twice, block tables cover what each
sequence computes, every running decode is in the plan unless it was preempted (stall-free),
preemption takes the most recently admitted request, and block-manager invariants hold.
At the end every request finished as its stop conditions say, every block is free, and the
outputs equal those of a run with room for everything at once: chunking, preemption and
prefix caching must not change what the model sees.
"""

from __future__ import annotations

import pytest
from helpers import fake_executor as helpers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from joule.engine.kv_blocks import KVBlockManager
from joule.engine.request import Request, RequestStatus
from joule.engine.scheduler import Scheduler
from joule.engine.scheduler_config import SchedulerConfig
from joule.sampling_params import SamplingParams

CheckedEngine, RequestSpec, reference_results = helpers.CheckedEngine, helpers.RequestSpec, helpers.reference_results

WORKLOAD_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def workloads(draw, max_requests: int = 8):
    """Requests sharing prefixes (small alphabet), some stop conditions, and a tight engine config."""
    shared_prefix = draw(st.lists(st.integers(2, 5), max_size=9))
    specs: list[RequestSpec] = []
    for index in range(draw(st.integers(1, max_requests))):
        prefix = shared_prefix if draw(st.booleans()) else []
        prompt = prefix + draw(st.lists(st.integers(2, 5), min_size=0 if prefix else 1, max_size=10))
        max_tokens = draw(st.integers(1, 12))
        spec = RequestSpec(
            request_id=f"req-{index}",
            prompt=prompt,
            max_tokens=max_tokens,
            min_tokens=draw(st.integers(0, max_tokens)) if draw(st.booleans()) else 0,
            stop_token_ids=draw(st.sampled_from([(), (), (7,), (7, 11)])),
            ignore_eos=draw(st.booleans()),
            with_eos=draw(st.booleans()),
            cache_salt=draw(st.sampled_from([None, None, None, "tenant"])),
        )
        specs.append(spec)
        if draw(st.integers(0, 4)) == 0:  # an n > 1 request: siblings share the prompt and a group
            spec.group_id = f"group-{index}"
            for sibling in range(draw(st.integers(1, 2))):
                specs.append(
                    RequestSpec(
                        request_id=f"req-{index}-sample-{sibling + 1}",
                        prompt=list(prompt),
                        max_tokens=max_tokens,
                        group_id=spec.group_id,
                        cache_salt=spec.cache_salt,
                    )
                )
    block_size = draw(st.integers(1, 4))
    longest = max(len(spec.prompt) + spec.max_tokens for spec in specs)
    blocks_for_longest = -(-longest // block_size)  # the engine must fit one request of max_model_len
    engine_args = dict(
        num_blocks=draw(st.integers(blocks_for_longest, blocks_for_longest + 8)),
        block_size=block_size,
        max_num_batched_tokens=draw(st.one_of(st.integers(1, 4), st.integers(1, 64))),
        max_num_seqs=draw(st.integers(1, 8)),
        max_model_len=longest,
        enable_prefix_caching=draw(st.booleans()),
    )
    return specs, engine_args


def run_workload(specs, engine_args, on_step=None) -> tuple[dict, CheckedEngine]:
    engine = CheckedEngine(**engine_args)
    for spec in specs:
        engine.add(spec)
    return engine.run(on_step=on_step), engine


@WORKLOAD_SETTINGS
@given(workloads())
def test_tight_budgets_give_the_same_outputs_as_unlimited_room(workload):
    specs, engine_args = workload
    results, engine = run_workload(specs, engine_args)
    assert results == reference_results(specs)
    assert engine.stats.finished_order and len(results) == len(specs)


@WORKLOAD_SETTINGS
@given(workloads(), st.lists(st.tuples(st.integers(0, 30), st.integers(0, 40)), min_size=1, max_size=4))
def test_aborts_free_blocks_at_once_and_others_still_complete(workload, aborts):
    specs, engine_args = workload
    aborts_by_step: dict[int, list[int]] = {}
    for step, choice in aborts:
        aborts_by_step.setdefault(step, []).append(choice)

    def abort_some(engine: CheckedEngine) -> None:
        for choice in aborts_by_step.get(engine.stats.num_steps, []):
            engine.abort(specs[choice % len(specs)].request_id)  # a no-op on finished requests

    results, engine = run_workload(specs, engine_args, on_step=abort_some)
    reference = reference_results(specs)
    assert results == {request_id: reference[request_id] for request_id in results}
    assert set(results) | engine.aborted == {spec.request_id for spec in specs}


def test_budget_of_one_token_still_finishes_everything():
    specs = [RequestSpec(f"r{i}", prompt=[2, 3, 4, 5][: i + 1], max_tokens=3, with_eos=False) for i in range(4)]
    results, engine = run_workload(
        specs, dict(
            num_blocks=8, block_size=2, max_num_batched_tokens=1, max_num_seqs=4, max_model_len=8,
            enable_prefix_caching=False,
        ),
    )
    assert results == reference_results(specs)
    # One token per step: every prompt token and every generated token but the last is computed once.
    assert engine.stats.num_steps == sum(len(s.prompt) + s.max_tokens - 1 for s in specs)


def test_decodes_are_never_skipped_for_a_prefill():
    """Three decoding requests and a long prompt under a budget of 4: each step is 3 decodes + 1 prompt token."""
    engine = CheckedEngine(num_blocks=64, block_size=4, max_num_batched_tokens=4, max_num_seqs=8, max_model_len=64)
    decoders = [engine.add(RequestSpec(f"d{i}", prompt=[2], max_tokens=30, with_eos=False)) for i in range(3)]
    engine.step()  # admits the three one-token prompts
    long_prompt = engine.add(RequestSpec("long", prompt=[3] * 20, max_tokens=2, with_eos=False))
    for step in range(20):
        outputs_before = [d.num_output_tokens for d in decoders]
        engine.step()
        assert [d.num_output_tokens for d in decoders] == [n + 1 for n in outputs_before]
        assert long_prompt.num_computed_tokens == step + 1
    assert long_prompt.num_output_tokens == 1


def test_preemption_takes_the_newest_request_and_recomputes_it():
    """Two requests that cannot both grow: the later one is preempted, then finishes after recompute."""
    specs = [
        RequestSpec("older", prompt=[2, 3, 4], max_tokens=6, with_eos=False),
        RequestSpec("newer", prompt=[5, 4, 3], max_tokens=6, with_eos=False),
    ]
    engine = CheckedEngine(
        num_blocks=5, block_size=2, max_num_batched_tokens=16, max_num_seqs=2, max_model_len=9,
        enable_prefix_caching=False,
    )
    older, newer = (engine.add(spec) for spec in specs)
    preempted_first = None
    while engine.core.has_unfinished_requests():
        engine.step()
        if engine.core.last_step.preempted_request_ids and preempted_first is None:
            preempted_first = engine.core.last_step.preempted_request_ids[0]
            assert newer.status is RequestStatus.PREEMPTED and older.status is RequestStatus.RUNNING
    engine.check_all_free()
    assert preempted_first == "newer"
    assert older.num_preemptions == 0 and newer.num_preemptions >= 1
    assert engine.results() == reference_results(specs)


def test_waiting_queue_is_first_come_first_served_under_max_num_seqs():
    specs = [RequestSpec(f"r{i}", prompt=[2, 3], max_tokens=4, with_eos=False) for i in range(5)]
    engine = CheckedEngine(num_blocks=32, block_size=2, max_num_batched_tokens=64, max_num_seqs=2, max_model_len=8)
    for spec in specs:
        engine.add(spec)
    engine.step()
    assert [r.request_id for r in engine.scheduler.running] == ["r0", "r1"]
    engine.run()
    assert engine.stats.max_running == 2
    assert engine.stats.finished_order == [f"r{i}" for i in range(5)]


# -- add_request validation ---------------------------------------------------------------


def make_scheduler(max_model_len: int = 8) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16, max_model_len=max_model_len)
    return Scheduler(config, KVBlockManager(16, 2))


def plain_request(request_id: str, prompt) -> Request:
    return Request(request_id, list(prompt), SamplingParams(), max_tokens=4)


def test_add_request_rejects_duplicate_ids_and_empty_or_overlong_prompts():
    scheduler = make_scheduler(max_model_len=8)
    scheduler.add_request(plain_request("a", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add_request(plain_request("a", [3]))
    with pytest.raises(ValueError, match="at least one token"):
        scheduler.add_request(plain_request("empty", []))
    with pytest.raises(ValueError, match="max_model_len"):
        scheduler.add_request(plain_request("long", [1] * 8))
    assert [r.request_id for r in scheduler.waiting] == ["a"]


@pytest.mark.parametrize("field_name", ["max_num_seqs", "max_num_batched_tokens", "max_model_len"])
@pytest.mark.parametrize("bad_value", [0, -1, True, 2.0])
def test_scheduler_config_rejects_non_positive_integers(field_name, bad_value):
    with pytest.raises(ValueError, match=field_name):
        SchedulerConfig(**{field_name: bad_value})


def test_abort_of_a_waiting_request_removes_it_from_the_queue():
    scheduler = make_scheduler()
    scheduler.add_request(plain_request("a", [1, 2]))
    scheduler.add_request(plain_request("b", [3, 4]))
    aborted = scheduler.abort_request("a")
    assert aborted is not None and aborted.status is RequestStatus.FINISHED_ABORTED
    assert [r.request_id for r in scheduler.waiting] == ["b"]
    assert scheduler.abort_request("a") is None and scheduler.abort_request("unknown") is None


def test_request_that_can_never_fit_the_kv_cache_is_rejected_not_left_to_hang():
    """4 blocks of 2 hold 8 tokens; a 4-token prompt with 10 outputs needs KV for 13."""
    engine = CheckedEngine(num_blocks=4, block_size=2, max_num_batched_tokens=16, max_num_seqs=4, max_model_len=32)
    with pytest.raises(ValueError, match="KV cache"):
        engine.add(RequestSpec("too-big", prompt=[2, 3, 4, 5], max_tokens=10, with_eos=False))
    assert not engine.core.has_unfinished_requests()
    # Exactly at capacity (4 + 5 - 1 = 8 tokens of KV) is fine and runs to completion.
    engine.add(RequestSpec("fits", prompt=[2, 3, 4, 5], max_tokens=5, with_eos=False))
    assert engine.run(max_steps=100)["fits"][1] == "length"


@settings(max_examples=60, deadline=None)
@given(
    num_blocks=st.integers(1, 8),
    block_size=st.integers(1, 4),
    prompt_length=st.integers(1, 12),
    max_tokens=st.integers(1, 12),
    max_model_len=st.integers(2, 30),
)
def test_every_accepted_request_finishes(num_blocks, block_size, prompt_length, max_tokens, max_model_len):
    """Whatever the KV size, add_request either rejects a request or the engine finishes it."""
    engine = CheckedEngine(
        num_blocks=num_blocks, block_size=block_size, max_num_batched_tokens=8, max_num_seqs=2,
        max_model_len=max_model_len,
    )
    specs = [RequestSpec(f"r{i}", [2 + i] * prompt_length, max_tokens, with_eos=False) for i in range(2)]
    worst_case_kv_tokens = min(prompt_length + max_tokens, max_model_len) - 1
    fits = prompt_length < max_model_len and worst_case_kv_tokens <= num_blocks * block_size
    for spec in specs:
        if fits:
            engine.add(spec)
        else:
            with pytest.raises(ValueError):
                engine.add(spec)
    results = engine.run(max_steps=2_000)
    assert len(results) == (2 if fits else 0)
    for outputs, reason, _ in results.values():
        assert reason == "length"
        assert len(outputs) == min(max_tokens, max_model_len - prompt_length)


def test_bare_token_ids_from_the_device_update_requests_as_sampled_tokens_do():
    """An executor that sampled every row on its device hands over bare ids (``StepResult.token_ids``): the same
    outputs, stops and released blocks as ``SampledToken``s."""
    from joule.engine.plan import StepResult
    from joule.engine.request import SampledToken

    finished = {}
    for form in ("sampled", "token_ids"):
        scheduler = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=32),
                              KVBlockManager(16, 2))
        requests = [Request("stops", [2, 3], SamplingParams(stop_token_ids=[9]), 5),
                    Request("runs", [4], SamplingParams(ignore_eos=True), 5)]
        for request in requests:
            scheduler.add_request(request)
        for tokens in ({"stops": 5, "runs": 9}, {"stops": 9, "runs": 6}):
            plan = scheduler.schedule()
            result = (StepResult(sampled={key: SampledToken(value) for key, value in tokens.items()})
                      if form == "sampled" else StepResult(token_ids=tokens))
            scheduler.update(plan, result)
        finished[form] = ([(r.request_id, r.output_token_ids, r.status) for r in requests],
                          scheduler.block_manager.num_free_blocks)
    assert finished["sampled"] == finished["token_ids"]
    assert finished["token_ids"][0] == [("stops", [5, 9], RequestStatus.FINISHED_STOPPED),
                                        ("runs", [9, 6], RequestStatus.RUNNING)]
