"""Random workloads run with the lookahead give the plain loop's tokens and leave no block behind.

The lookahead plans each step before the step ahead of it is applied (prompt chunks, admissions, sampled and
greedy decodes); hypothesis draws prompts, output lengths, token budgets, cache sizes, arrival steps, stop
tokens, seeded sampling, aborts, the policy (fcfs or priority) and priorities, and each draw runs twice on the
same tiny model: lookahead off and on.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers.tiny_models import build_tiny_checkpoint

from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind, SamplingParams

BLOCK_SIZE = 4
BYTES_PER_BLOCK = 1024  # the tiny llama-gqa4-tied model's KV bytes per 4-token block (float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("lookahead-property-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return directory


request_strategy = st.fixed_dictionaries({
    "prompt": st.lists(st.integers(3, 120), min_size=1, max_size=18),
    "max_tokens": st.integers(1, 8),
    "arrival_step": st.integers(0, 6),
    "sampled": st.booleans(),
    "seed": st.integers(0, 1000),
    "stop_after": st.none() | st.integers(0, 5),  # stop on the token it would sample at this index
    "priority": st.integers(0, 2),  # used under the priority policy
})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(requests=st.lists(request_strategy, min_size=1, max_size=6), budget=st.integers(4, 20),
       num_blocks=st.integers(8, 30), abort=st.none() | st.tuples(st.integers(0, 5), st.integers(1, 8)),
       policy=st.sampled_from(["fcfs", "priority"]), queue_prompts=st.booleans())
def test_lookahead_matches_the_plain_loop_on_random_workloads(model_dir, requests, budget, num_blocks, abort, policy,
                                                               queue_prompts):
    def engine_for(lookahead: bool) -> LLMEngine:
        engine = LLMEngine.from_kwargs(model=str(model_dir), device="cpu", dtype="float32", max_model_len=32,
                                       kv_cache_memory_bytes=num_blocks * BYTES_PER_BLOCK, block_size=BLOCK_SIZE,
                                       max_num_batched_tokens=32, decode_lookahead=lookahead,
                                       scheduling_policy=policy)
        engine.core.scheduler.config.max_num_batched_tokens = budget
        engine.core.scheduler.config.lookahead_prompts = queue_prompts  # prompt steps queued ahead too, or decodes only
        return engine

    def params(spec, stop_ids=()) -> SamplingParams:
        return SamplingParams(temperature=0.9 if spec["sampled"] else 0.0, seed=spec["seed"] if spec["sampled"] else None,
                              max_tokens=spec["max_tokens"], ignore_eos=True, stop_token_ids=list(stop_ids),
                              output_kind=RequestOutputKind.FINAL_ONLY)

    def run(engine: LLMEngine, stops: dict[int, int]) -> dict:
        arrivals: dict[int, list[int]] = {}
        for index, spec in enumerate(requests):
            arrivals.setdefault(spec["arrival_step"], []).append(index)
        results, step = {}, 0
        while engine.has_unfinished_requests() or any(later >= step for later in arrivals):
            for index in arrivals.pop(step, []):
                stop_ids = [stops[index]] if index in stops else []
                engine.add_request(f"r{index}", {"prompt_token_ids": requests[index]["prompt"]},
                                   params(requests[index], stop_ids), priority=requests[index]["priority"])
            if abort is not None and step == abort[1] and abort[0] < len(requests):
                engine.abort_request(f"r{abort[0]}")
            for output in engine.step():
                results[output.request_id] = (list(output.outputs[0].token_ids), output.outputs[0].finish_reason)
            step += 1
        return results

    reference = run(engine_for(False), {})
    # A stop token each stopping request would sample (found in the run without stops): it then ends early.
    stops = {index: reference[f"r{index}"][0][spec["stop_after"]] for index, spec in enumerate(requests)
             if spec["stop_after"] is not None and f"r{index}" in reference
             and spec["stop_after"] < len(reference[f"r{index}"][0])}
    aborted = f"r{abort[0]}" if abort is not None else None
    plain_engine = engine_for(False)
    expected = run(plain_engine, stops)
    engine = engine_for(True)
    free_before = engine.block_manager.num_free_blocks
    results = run(engine, stops)
    assert {k: v for k, v in results.items() if k != aborted} == {k: v for k, v in expected.items() if k != aborted}
    assert engine.block_manager.num_free_blocks == free_before
    assert not engine.core.scheduler.running and not engine.core.scheduler.waiting
    engine.block_manager.check_invariants([])
