"""LLM.generate adds its requests as the engine wants them (joule/offline_loop.py): the first steps' worth, then
more between steps. The steps must be exactly those of adding everything first, and so must the tokens."""

from __future__ import annotations

import itertools
import random

import pytest
from helpers.tiny_models import build_tiny_checkpoint

from joule import LLM, SamplingParams
from joule.llm_engine import FEED_AHEAD_STEPS

NEW_TOKENS = 6
BUDGET = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-offline-loop")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    generator = random.Random(5)
    prompts = [[generator.randrange(3, 211) for _ in range(generator.randrange(1, 30))] for _ in range(24)]
    return directory, prompts


def _recorded_llm(directory, **settings) -> tuple[LLM, list, list]:
    """An LLM whose executor records every launched plan as (request id, tokens) pairs, and the number of requests
    the engine held at each step."""
    llm = LLM(model=str(directory), dtype="float32", device="cpu", block_size=4, max_num_batched_tokens=BUDGET,
              kv_cache_memory_bytes=1 << 22, **settings)
    engine = llm.llm_engine
    plans, held = [], []
    launch = engine.core.executor.launch
    step = engine.step

    def recording_launch(plan, previous=None):
        plans.append([(sequence.request.request_id, sequence.num_tokens) for sequence in plan.sequences])
        return launch(plan, previous)

    def recording_step():
        held.append(engine.get_num_unfinished_requests())
        return step()

    engine.core.executor.launch = recording_launch
    engine.step = recording_step
    return llm, plans, held


@pytest.mark.parametrize("lookahead", [False, True])
@pytest.mark.parametrize("max_num_seqs", [256, 2])  # 2: the batch cap, not the budget, bounds what waits
def test_generate_plans_the_same_steps_as_adding_everything_first(checkpoint, lookahead, max_num_seqs):
    directory, prompts = checkpoint
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    fed, fed_plans, held = _recorded_llm(directory, decode_lookahead=lookahead, max_num_seqs=max_num_seqs)
    outputs = fed.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False)

    upfront, upfront_plans, _ = _recorded_llm(directory, decode_lookahead=lookahead, max_num_seqs=max_num_seqs)
    engine = upfront.llm_engine
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output.outputs[0].token_ids

    assert fed_plans == upfront_plans
    assert [output.outputs[0].token_ids for output in outputs] == [finished[str(i)] for i in range(len(prompts))]
    # The first step started with the requests holding FEED_AHEAD_STEPS budgets of prompt tokens, or a batch's worth
    # if fewer: not all 24.
    totals = list(itertools.accumulate(len(prompt) for prompt in prompts))
    by_budget = next(count for count, total in enumerate(totals, 1) if total >= FEED_AHEAD_STEPS * BUDGET)
    assert held[0] == min(by_budget, max_num_seqs) < len(prompts)
    assert fed.llm_engine.block_manager.num_free_blocks == fed.llm_engine.block_manager.num_blocks


def test_other_policies_get_every_request_first(checkpoint):
    directory, prompts = checkpoint
    llm, _, held = _recorded_llm(directory, scheduling_policy="priority")
    llm.generate([{"prompt_token_ids": prompt} for prompt in prompts],
                 SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert held[0] == len(prompts)  # priority reorders the whole queue: nothing may be held back


def test_refused_prompts_among_the_first_do_not_end_the_run(checkpoint):
    directory, prompts = checkpoint
    llm, _, _ = _recorded_llm(directory)
    bad = [{"prompt_token_ids": []}] * 5 + [{"prompt_token_ids": [10_000]}]
    outputs = llm.generate(bad + [{"prompt_token_ids": prompt} for prompt in prompts[:3]] + bad,
                           SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)
    assert [output.error is None for output in outputs] == [False] * 6 + [True] * 3 + [False] * 6
    assert all(len(output.outputs[0].token_ids) == 2 for output in outputs[6:9])
