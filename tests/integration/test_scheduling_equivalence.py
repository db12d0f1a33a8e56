"""Greedy tokens of the real (tiny) model do not depend on the scheduling policy, admission, prefill mode or
decode lookahead.

The deadline policy with a TPOT no step can meet forces one-block prompt chunks next to
decodes; predicted admission holds requests back in a small KV cache; prefill-first runs
whole prompts apart from decodes. None of it may change a token.
"""

from __future__ import annotations

import random

import pytest
from helpers.tiny_models import build_tiny_checkpoint, transformers_greedy

from joule import LLM, SamplingParams
from joule.engine.request import RequestSLO
from joule.engine.step_time import StepTimeCoefficients, StepTimeEstimator
from joule.model.config import ModelConfig

NEW_TOKENS = 10
PROMPT_LENGTHS = [1, 5, 17, 40, 63, 9]
SETTINGS = {
    "deadline-tight-tpot": dict(block_size=4, max_num_batched_tokens=64, scheduling_policy="deadline"),
    "predicted-admission": dict(block_size=4, max_num_batched_tokens=32, max_model_len=80, kv_blocks=30,
                                admission_policy="predicted"),
    "prefill-first": dict(block_size=4, max_num_batched_tokens=80, max_model_len=80, kv_blocks=30,
                          enable_chunked_prefill=False),
    # A cache so small that requests are preempted and recomputed, with decode steps queued ahead.
    "lookahead-small-cache": dict(block_size=4, max_num_batched_tokens=32, max_model_len=80, kv_blocks=30,
                                  decode_lookahead=True),
    "lookahead-prefill-first": dict(block_size=4, max_num_batched_tokens=80, max_model_len=80, kv_blocks=30,
                                    enable_chunked_prefill=False, decode_lookahead=True),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-scheduling")
    model = build_tiny_checkpoint("llama-gqa4-tied", directory)
    generator = random.Random(3)
    prompts = [[generator.randrange(3, 211) for _ in range(length)] for length in PROMPT_LENGTHS]
    return directory, prompts, [transformers_greedy(model, prompt, NEW_TOKENS) for prompt in prompts]


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_greedy_tokens_do_not_depend_on_scheduling(checkpoint, setting):
    directory, prompts, expected = checkpoint
    settings = dict(SETTINGS[setting])
    config = ModelConfig.from_file(directory / "config.json")
    block_bytes = 2 * config.num_hidden_layers * settings["block_size"] * config.num_key_value_heads * config.head_dim * 4
    llm = LLM(model=str(directory), dtype="float32", device="cpu",
              kv_cache_memory_bytes=settings.pop("kv_blocks", 4096) * block_bytes, **settings)
    engine = llm.llm_engine
    scheduler = engine.core.scheduler
    # Known step costs so the deadline policy cuts from the first step: 10 ms + 1 ms per token.
    scheduler.step_time = StepTimeEstimator(min_observations=10**9, prior=StepTimeCoefficients(0.01, 0.001, 0.001))
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    slo = RequestSLO(ttft_seconds=1.0, tpot_seconds=1e-4)
    plans = []
    original_schedule = scheduler.schedule

    def recording_schedule(now: float = 0.0):
        plan = original_schedule(now)
        plans.append([(s.num_tokens, s.samples, s.start_position < s.request.num_prompt_tokens) for s in plan.sequences])
        return plan

    scheduler.schedule = recording_schedule
    continuations = []
    launch = engine.core.executor.launch
    engine.core.executor.launch = lambda plan, previous=None: (
        continuations.append(plan) if previous is not None else None) or launch(plan, previous)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), {"prompt_token_ids": prompt}, params, arrival_time=float(index), slo=slo)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids
    assert [finished[str(index)] for index in range(len(prompts))] == expected
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert bool(continuations) == settings.get("decode_lookahead", False)
    if setting == "lookahead-small-cache":
        assert scheduler.num_preemptions > 0  # recomputed requests came back under lookahead too
    if setting == "deadline-tight-tpot":  # prompt chunks next to decodes were cut to one block
        mixed = [plan for plan in plans if not all(is_prompt for _, _, is_prompt in plan)
                 and any(is_prompt for _, _, is_prompt in plan)]
        assert mixed and all(n <= 4 for plan in mixed for n, _, is_prompt in plan if is_prompt)
    if setting == "prefill-first":
        for plan in plans:
            prompt_work = [is_prompt for _, _, is_prompt in plan]
            assert all(prompt_work) or not any(prompt_work), "a step mixed prompt and decode work"


def test_prefill_first_needs_a_budget_for_the_longest_prompt(checkpoint):
    directory, _, _ = checkpoint
    with pytest.raises(ValueError, match="max_num_batched_tokens=64"):  # max_model_len defaults to 512 here
        LLM(model=str(directory), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 20,
            enable_chunked_prefill=False, max_num_batched_tokens=64)
    llm = LLM(model=str(directory), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 20,
              enable_chunked_prefill=False, max_num_seqs=4)
    config = llm.llm_engine.core.scheduler.config
    assert not config.enable_chunked_prefill and config.max_num_batched_tokens >= config.max_model_len
