"""The executor's all-greedy shortcut (an argmax, no sampling rows) gives what the sampler gives, and rows
that need the sampler (penalties, logprobs, min_tokens bans, temperature) still go through it."""

from __future__ import annotations

import pytest
from helpers.tiny_models import build_tiny_checkpoint

from joule.llm_engine import LLMEngine
from joule.runtime.sampling_rows import plain_greedy
from joule.runtime.sampler import Sampler
from joule.sampling_params import RequestOutputKind, SamplingParams


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("executor-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return LLMEngine.from_kwargs(model=str(directory), device="cpu", dtype="float32", kv_cache_memory_bytes=1 << 22)


def _run(engine, params_list):
    for index, params in enumerate(params_list):
        engine.add_request(f"r{index}-{id(params)}", {"prompt_token_ids": [5, 9, 13 + index, 40]}, params)
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            results[output.request_id] = output.outputs[0]
    engine.block_manager.reset_prefix_cache()
    return [results[f"r{index}-{id(params)}"] for index, params in enumerate(params_list)]


def test_plain_greedy_needs_no_sampler_and_matches_it(engine, monkeypatch):
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    calls = []
    original = Sampler.sample
    monkeypatch.setattr(Sampler, "sample", lambda self, logits, rows: calls.append(len(rows)) or original(
        self, logits, rows))
    shortcut = [output.token_ids for output in _run(engine, [plain, plain.clone()])]
    assert calls == []  # every step of plain greedy requests took the argmax shortcut
    with_logprobs = plain.clone(logprobs=0)  # the sampler path: same greedy tokens
    through_sampler = [output.token_ids for output in _run(engine, [with_logprobs, with_logprobs.clone()])]
    assert calls and through_sampler == shortcut


def test_rows_needing_the_sampler_are_not_plain(engine):
    from joule.engine.request import Request

    def request(**changes):
        params = SamplingParams(temperature=0.0, max_tokens=4).clone(**changes)
        return Request("x", [1, 2], params, 4, eos_token_ids=frozenset({2}))

    assert plain_greedy(request())
    for changes in ({"temperature": 0.7}, {"logprobs": 2}, {"repetition_penalty": 1.2},
                    {"frequency_penalty": 0.5}, {"presence_penalty": 0.5}, {"min_tokens": 2}):
        assert not plain_greedy(request(**changes)), changes
    done = request(min_tokens=1)
    done.output_token_ids.append(7)
    assert plain_greedy(done)  # past min_tokens nothing is banned any more


def test_prompt_steps_send_only_their_sampling_rows_past_the_last_layers_attention(engine, monkeypatch):
    model = engine.core.executor.model
    original, seen = model.forward, []

    def recorded(input_ids, positions, context, output_rows=None):
        seen.append((input_ids.shape[0], None if output_rows is None else output_rows.tolist()))
        return original(input_ids, positions, context, output_rows)

    monkeypatch.setattr(model, "forward", recorded)
    plain = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    _run(engine, [plain, plain.clone()])
    assert seen[0] == (8, [3, 7])  # two 4-token prompts: each one's last row samples
    assert all(rows is None for _, rows in seen[1:])  # decode steps: every row samples
    seen.clear()
    _run(engine, [plain.clone(prompt_logprobs=1)])  # prompt logprobs score every prompt row
    assert seen[0] == (4, None)
