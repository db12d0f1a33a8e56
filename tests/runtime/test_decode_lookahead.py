"""Decode lookahead: the next greedy decode step queued before this one's tokens are read gives the very
tokens of the plain loop, with stop tokens, length stops, aborts, late arrivals and sampled requests about,
and leaves no KV block behind."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

from helpers.markers import interpreted_triton_on_cpu
from helpers.tiny_models import build_tiny_checkpoint

from joule.engine.plan import CONTINUATION_TOKEN
from joule.engine.policies import make_policy
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lookahead-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return directory


def _engine(model_dir, lookahead: bool) -> LLMEngine:
    """With prompt steps queued ahead too (``lookahead_prompts``, the default), set here so these tests keep
    exercising it whatever the default becomes."""
    engine = LLMEngine.from_kwargs(model=str(model_dir), device="cpu", dtype="float32", kv_cache_memory_bytes=1 << 21,
                                   max_model_len=128, block_size=4, decode_lookahead=lookahead)
    engine.core.scheduler.config.lookahead_prompts = True
    return engine


def _params(**changes) -> SamplingParams:
    values = dict(temperature=0.0, max_tokens=12, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    values.update(changes)
    return SamplingParams(**values)


def _run(engine: LLMEngine, requests, arrivals=None, abort_at=None) -> dict:
    """Step to the end; ``arrivals``: {step: [(id, prompt, params)]} added before that step; ``abort_at``:
    {step: id}. Returns id -> (token ids, finish reason)."""
    arrivals = arrivals or {}
    abort_at = abort_at or {}
    for request_id, prompt, params in requests:
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
    results, step = {}, 0
    while engine.has_unfinished_requests() or any(later > step for later in arrivals):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, {"prompt_token_ids": prompt}, params)
        if step in abort_at:
            engine.abort_request(abort_at[step])
        for output in engine.step():
            results[output.request_id] = (list(output.outputs[0].token_ids), output.outputs[0].finish_reason)
        step += 1
    return results


def _workload():
    prompts = [[5, 9, 13, 40], [7, 7, 8, 100, 3, 2, 1], [50, 51], [9] * 11, [60, 61, 62]]
    return [
        ("plain-a", prompts[0], _params()),
        ("short", prompts[1], _params(max_tokens=3)),
        ("stops", prompts[2], _params(max_tokens=30, stop_token_ids=[])),  # stop id filled in below
        ("long", prompts[3], _params(max_tokens=20)),
        ("sampled", prompts[4], _params(temperature=0.9, seed=3)),
    ]


def test_lookahead_gives_the_plain_loops_tokens(model_dir, monkeypatch):
    plain = _engine(model_dir, lookahead=False)
    reference = _run(plain, _workload())
    # Stop "stops" on the 4th token it sampled without a stop: the request ends early, mid-lookahead.
    stop_token = reference["stops"][0][3]
    workload = [(rid, prompt, params.clone(stop_token_ids=[stop_token]) if rid == "stops" else params)
                for rid, prompt, params in _workload()]
    late = {6: [("late", [11, 12, 13], _params(max_tokens=5))]}
    expected = _run(_engine(model_dir, lookahead=False), workload, arrivals=late)
    assert expected["stops"][1] == "stop" and len(expected["stops"][0]) <= 4

    engine = _engine(model_dir, lookahead=True)
    free_before = engine.block_manager.num_free_blocks
    continuations = []
    original = engine.core.executor.launch
    monkeypatch.setattr(engine.core.executor, "launch", lambda plan, previous=None: (
        continuations.append(len(plan.sequences)) if previous is not None else None) or original(plan, previous))
    assert _run(engine, workload, arrivals=late) == expected
    assert continuations, "no continuation step was launched"
    assert engine.block_manager.num_free_blocks == free_before
    assert not engine.core.scheduler.running and not engine.core.scheduler.waiting
    _assert_no_energy_left_on_released_requests(engine)


def _assert_no_energy_left_on_released_requests(engine: LLMEngine) -> None:
    """A dropped extra token's step is not charged to its (already released) request: nothing is left in
    the ledger once every request is done (a server would otherwise keep one entry per such request)."""
    ledger = engine.energy_ledger
    assert ledger.totals().attributed_joules == pytest.approx(ledger.released_joules)
    assert ledger.released_joules > 0


def test_lookahead_goes_on_past_sampled_requests_with_their_seeded_tokens(model_dir, monkeypatch):
    """Temperature, top-k, top-p and min-p sample on the device, so continuations follow sampled steps too; a
    continuation samples the token after one not yet on the host, and its seeded noise is keyed on that token's
    position, so each seeded request gets the plain loop's tokens. Rows asking for logprobs still sample on
    the host, and the chain stops at them."""
    workload = [
        ("hot", [5, 9, 13, 40], _params(temperature=1.3, seed=7, max_tokens=14)),
        ("top-k", [7, 7, 8, 100], _params(temperature=0.8, top_k=5, seed=11, max_tokens=10)),
        ("top-p", [50, 51, 52], _params(temperature=0.9, top_p=0.7, min_p=0.02, seed=5, max_tokens=12)),
        ("greedy", [9] * 6, _params(max_tokens=9)),
    ]
    expected = _run(_engine(model_dir, lookahead=False), workload)
    engine = _engine(model_dir, lookahead=True)
    continuations = []
    original = engine.core.executor.launch
    monkeypatch.setattr(engine.core.executor, "launch", lambda plan, previous=None: (
        continuations.append(len(plan.sequences)) if previous is not None else None) or original(plan, previous))
    assert _run(engine, workload) == expected
    assert len(continuations) >= 8, "the chain stopped at sampled requests"

    with_logprobs = workload + [("logprobs", [3, 4, 5], _params(temperature=0.7, seed=2, logprobs=2, max_tokens=6))]
    expected = _run(_engine(model_dir, lookahead=False), with_logprobs)
    engine = _engine(model_dir, lookahead=True)
    continued_ids = []
    original = engine.core.executor.launch
    monkeypatch.setattr(engine.core.executor, "launch", lambda plan, previous=None: (
        continued_ids.extend(s.request_id for s in plan.sequences) if previous is not None else None
    ) or original(plan, previous))
    assert _run(engine, with_logprobs) == expected
    assert continued_ids and "logprobs" not in continued_ids, "a step whose logprobs need the host was continued"


def test_lookahead_with_aborts_frees_every_block(model_dir):
    workload = [(f"r{index}", [3 + index, 20, 30 + index], _params(max_tokens=15)) for index in range(4)]
    expected = _run(_engine(model_dir, lookahead=False), workload, abort_at={5: "r1", 9: "r2"})
    engine = _engine(model_dir, lookahead=True)
    free_before = engine.block_manager.num_free_blocks
    results = _run(engine, workload, abort_at={5: "r1", 9: "r2"})
    assert {key: value for key, value in results.items() if key not in ("r1", "r2")} == {
        key: value for key, value in expected.items() if key not in ("r1", "r2")}
    assert engine.block_manager.num_free_blocks == free_before
    assert not engine.has_unfinished_requests()
    _assert_no_energy_left_on_released_requests(engine)


def test_continuations_carry_prompts_under_fcfs_and_priority_only(model_dir):
    """Under fcfs a prompt step is followed by a continuation: the prompt's first decode (its token a
    placeholder), the next chunk of an unfinished prompt and a waiting request admitted within the budget.
    Under priority too, unless a waiting request outranks a running one (admitting it may take a preemption,
    which only a normal step does). With ``lookahead_prompts`` off, or the deadline or fair policy, prompt steps
    and waiting requests stop the chain."""
    engine = _engine(model_dir, lookahead=True)
    scheduler = engine.core.scheduler
    scheduler.config.max_num_batched_tokens = 8
    engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, _params())
    engine.add_request("b", {"prompt_token_ids": list(range(10, 20))}, _params())  # 10 tokens: two chunks
    plan = scheduler.schedule()
    assert [(s.request_id, s.num_tokens, s.samples) for s in plan.sequences] == [("a", 3, True), ("b", 5, False)]
    engine.add_request("c", {"prompt_token_ids": [4, 5, 6, 7]}, _params())
    continuation = scheduler.schedule_continuation(plan)
    assert [(s.request_id, s.token_ids, s.start_position, s.samples) for s in continuation.sequences] == [
        ("a", [CONTINUATION_TOKEN], 3, True), ("b", list(range(15, 20)), 5, True), ("c", [4, 5], 0, False)]
    assert not scheduler.waiting and scheduler.running == [scheduler.requests[i] for i in "abc"]
    # Blocks (4 tokens each) cover every planned position: a 4, b 10 (three blocks), c 2.
    assert [len(scheduler.requests[i].block_ids) for i in "abc"] == [1, 3, 1]

    for setting, policy in ((False, "fcfs"), (True, "deadline"), (True, "fair")):
        engine = _engine(model_dir, lookahead=True)
        scheduler = engine.core.scheduler
        scheduler.config.lookahead_prompts = setting
        scheduler.config.policy = policy
        scheduler.policy = make_policy(policy)
        engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, _params())
        plan = scheduler.schedule()
        assert scheduler.schedule_continuation(plan) is None  # a prompt step
        engine.core.executor.execute(plan)  # (the tokens do not matter here)
        engine.add_request("b", {"prompt_token_ids": [4, 5]}, _params())
        assert scheduler.schedule_continuation(plan) is None  # a request waits

    for waiting_priority, continued in ((1, True), (0, False)):  # equal rank: admitted ahead; higher: not
        engine = _engine(model_dir, lookahead=True)
        scheduler = engine.core.scheduler
        scheduler.config.policy = "priority"
        scheduler.policy = make_policy("priority")
        engine.add_request("a", {"prompt_token_ids": [1, 2, 3]}, _params(), priority=1)
        plan = scheduler.schedule()
        engine.add_request("b", {"prompt_token_ids": [4, 5]}, _params(), priority=waiting_priority)
        continuation = scheduler.schedule_continuation(plan)
        if continued:
            assert [s.request_id for s in continuation.sequences] == ["a", "b"]
        else:
            assert continuation is None and list(scheduler.waiting)[0].request_id == "b"


def test_prompt_lookahead_gives_the_plain_loops_tokens_with_chunks_stops_and_a_full_cache(model_dir):
    """Prompts arriving over time, chunked by a small budget, queued behind running steps: the same tokens
    as the plain loop, with stop tokens, aborts, a sampled request and a KV cache small enough that
    admissions wait for blocks (a continuation never preempts)."""
    prompts = {f"p{index}": [(7 * index + k) % 90 + 3 for k in range(5 + 3 * index)] for index in range(8)}

    def workload():
        return [(rid, prompt, _params(max_tokens=6 + index)) for index, (rid, prompt) in enumerate(prompts.items())
                if index < 5]

    late = {3: [("late-a", prompts["p5"], _params(max_tokens=9))],
            7: [("late-b", prompts["p6"], _params(max_tokens=4)),
                ("late-sampled", prompts["p7"], _params(temperature=0.8, seed=11, max_tokens=5))]}

    def engine_for(lookahead: bool, cache_bytes: int) -> LLMEngine:
        engine = LLMEngine.from_kwargs(model=str(model_dir), device="cpu", dtype="float32", max_model_len=64,
                                       kv_cache_memory_bytes=cache_bytes, block_size=4, max_num_batched_tokens=64,
                                       decode_lookahead=lookahead)
        engine.core.scheduler.config.max_num_batched_tokens = 12  # prompts of 5-26 tokens run in chunks
        engine.core.scheduler.config.lookahead_prompts = True
        return engine

    reference = _run(engine_for(False, 1 << 21), workload(), arrivals=late)
    stop_token = reference["p2"][0][2]
    stopping = [(rid, prompt, params.clone(stop_token_ids=[stop_token]) if rid == "p2" else params)
                for rid, prompt, params in workload()]
    for cache_bytes in (1 << 21, 16 * 1024):  # ample; 16 blocks of 4 tokens
        expected = _run(engine_for(False, cache_bytes), stopping, arrivals=late, abort_at={9: "p4"})
        engine = engine_for(True, cache_bytes)
        free_before = engine.block_manager.num_free_blocks
        prompt_continuations = []
        original = engine.core.executor.launch
        engine.core.executor.launch = lambda plan, previous=None: (
            prompt_continuations.append(plan.num_prefill_tokens) if previous is not None else None
        ) or original(plan, previous)
        results = _run(engine, stopping, arrivals=late, abort_at={9: "p4"})
        assert {k: v for k, v in results.items() if k != "p4"} == {k: v for k, v in expected.items() if k != "p4"}
        assert expected["p2"][1] == "stop"
        assert any(prompt_continuations), "no continuation carried prompt tokens"
        assert engine.block_manager.num_free_blocks == free_before
        assert not engine.has_unfinished_requests()
        if cache_bytes == 16 * 1024:
            assert engine.core.scheduler.num_preemptions > 0, "the small cache never ran short"


def _static_buffer_engine(model_dir, lookahead: bool, chunk_tokens: int | None = None) -> LLMEngine:
    """An engine whose steps run through the graph runners' static buffers (what CUDA graphs capture), eagerly
    through the Triton backend on the CPU; ``chunk_tokens``: prompt chunks too, up to that many tokens."""
    from joule.runtime.attention.triton_backend import TritonAttentionBackend
    from joule.runtime.cuda_graphs import DecodeGraphRunner
    from joule.runtime.prefill_graphs import PrefillChunkGraphRunner

    engine = _engine(model_dir, lookahead)
    executor = engine.core.executor
    executor.backend = TritonAttentionBackend()
    executor.graph_runner = DecodeGraphRunner(executor.model, executor.kv_cache, executor.backend,
                                              executor.device, max_num_seqs=4, max_model_len=128)
    if chunk_tokens is not None:
        executor.chunk_runner = PrefillChunkGraphRunner(executor.model, executor.kv_cache, executor.backend,
                                                        executor.device, max_num_batched_tokens=chunk_tokens,
                                                        max_model_len=128)
    executor.use_cuda_graphs = True
    return engine


@interpreted_triton_on_cpu
@pytest.mark.parametrize("feed", ["1", "0"])  # JOULE_GRAPH_FEED: the feed kernel, or a copy and a device copy
def test_lookahead_through_the_static_decode_buffers(model_dir, feed, monkeypatch):
    """Continuations replayed through the decode graph runner's padded static buffers (what a CUDA graph
    captures; run eagerly on the CPU through the Triton backend): inputs copied from the previous step's
    tokens into the device buffer, rows padded and re-mapped when a request drops out by length."""
    monkeypatch.setenv("JOULE_GRAPH_FEED", feed)
    workload = [(f"r{index}", [3 + index, 20, 30 + index, 9], _params(max_tokens=4 + 3 * index))
                for index in range(3)]
    results = {}
    for lookahead in (False, True):
        engine = _static_buffer_engine(model_dir, lookahead)
        executor = engine.core.executor
        assert executor.graph_runner._feeds == (feed == "1")
        sources = []
        run = executor.graph_runner.run
        executor.graph_runner.run = lambda plan, token_source=None: (
            sources.append(token_source is not None) or run(plan, token_source))
        results[lookahead] = _run(engine, workload)
        assert any(sources) == lookahead and len(sources) > 5
    assert results[True] == results[False]


@interpreted_triton_on_cpu
def test_prompt_continuations_through_the_static_graph_buffers(model_dir, monkeypatch):
    """Continuations that carry prompt chunks beside decodes go through the mixed-step runners (what CUDA
    graphs capture; eager through the Triton backend on the CPU): the decodes' inputs copied from the step
    before on the device, the chunks' from the host. The same tokens as the plain loop."""
    import joule.runtime.executor as executor_module

    workload = [(f"r{index}", [3 + index, 20, 30 + index, 9, 11, 4 + index], _params(max_tokens=5 + 2 * index))
                for index in range(3)]
    late = {2: [("late", [40, 41, 42, 43, 44, 45, 46], _params(max_tokens=6))],
            4: [("later", [50, 51, 52], _params(max_tokens=4))]}
    mixed_with_device_tokens = []
    original_mixed = executor_module.run_mixed_step

    def recording_mixed(plan, decode_runner, chunk_runner, decode_tokens=None):
        mixed_with_device_tokens.append(decode_tokens is not None and len(decode_tokens) > 0)
        return original_mixed(plan, decode_runner, chunk_runner, decode_tokens)

    monkeypatch.setattr(executor_module, "run_mixed_step", recording_mixed)
    results = {}
    for lookahead in (False, True):
        engine = _static_buffer_engine(model_dir, lookahead, chunk_tokens=32)
        mixed_with_device_tokens.clear()
        results[lookahead] = _run(engine, workload, arrivals=late)
        assert any(mixed_with_device_tokens) == lookahead
    assert results[True] == results[False]


def test_lookahead_is_on_by_default_with_cuda_only_and_can_be_forced_either_way(model_dir):
    from joule.config import EngineConfig
    from joule.engine.core import lookahead_on

    assert lookahead_on(None, on_gpu=True) is True
    assert lookahead_on(None, on_gpu=False) is False
    assert lookahead_on(True, on_gpu=False) is True
    assert lookahead_on(False, on_gpu=True) is False
    assert _engine(model_dir, None).core.decode_lookahead is False  # auto on the CPU
    assert _engine(model_dir, True).core.decode_lookahead is True
    with pytest.raises(ValueError, match="decode_lookahead"):
        EngineConfig(decode_lookahead="yes")


def test_no_continuation_when_the_step_left_running_decodes_out(model_dir):
    """A step that carries only some running decodes (the fair policy's half-decode steps) must not chain
    continuations of those alone: the others would wait as long as the chain lasts."""
    engine = _engine(model_dir, lookahead=True)
    for index in range(3):
        engine.add_request(f"r{index}", {"prompt_token_ids": [3 + index, 20]}, _params())
    scheduler = engine.core.scheduler
    engine.core.decode_lookahead = False
    engine.step()  # prompts in, first tokens out
    plan = scheduler.schedule()
    assert len(plan.sequences) == len(scheduler.running) == 3
    plan.sequences = plan.sequences[:2]  # as a policy that holds one decode back would plan it
    assert scheduler.schedule_continuation(plan) is None


def test_step_times_do_not_overlap_with_the_lookahead(model_dir):
    """A continuation is launched before the step ahead of it is collected; its recorded step time starts when
    that step's tokens were collected, so step times add up to no more than the run's wall time (the step-time
    estimator behind the fair and deadline policies reads them)."""
    import time

    engine = _engine(model_dir, lookahead=True)
    for index in range(3):
        engine.add_request(f"r{index}", {"prompt_token_ids": [3 + index, 20, 7]}, _params(max_tokens=20))
    started = time.perf_counter()
    total = 0.0
    while engine.has_unfinished_requests():
        engine.step()
        total += engine.core.last_step.elapsed_seconds
    assert 0 < total <= time.perf_counter() - started
