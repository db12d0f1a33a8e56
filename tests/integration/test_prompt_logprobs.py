"""Prompt logprobs (vLLM's ``SamplingParams.prompt_logprobs``): every prompt token scored against transformers,
whatever the chunking, prefix cache, preemption, n or output kind."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.tiny_models import build_tiny_checkpoint

from joule import LLM, SamplingParams
from joule.llm_engine import LLMEngine
from joule.sampling_params import RequestOutputKind

NUM_TOP = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-prompt-logprobs")
    return directory, build_tiny_checkpoint("llama-gqa4-tied", directory)


def _engine_options(**overrides) -> dict:
    options = dict(dtype="float32", device="cpu", block_size=4, max_model_len=256, kv_cache_memory_bytes=4 << 20,
                   max_num_batched_tokens=64)
    options.update(overrides)
    return options


def _prompt_ids(seed: int, length: int) -> list[int]:
    generator = random.Random(seed)
    return [generator.randrange(3, 211) for _ in range(length)]


def _transformers_prompt_logprobs(model, prompt_ids: list[int]) -> torch.Tensor:
    """Row i: log-softmax over the vocabulary after prompt tokens 0..i."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    return torch.log_softmax(logits.float(), dim=-1)


def _check_against_transformers(prompt_logprobs, prompt_ids, expected: torch.Tensor, num_top: int = NUM_TOP) -> None:
    assert prompt_logprobs[0] is None, "nothing comes before the first prompt token"
    assert len(prompt_logprobs) == len(prompt_ids)
    for position in range(1, len(prompt_ids)):
        entry = prompt_logprobs[position]
        token = prompt_ids[position]
        row = expected[position - 1]
        first_token, first = next(iter(entry.items()))
        assert first_token == token, "the prompt token itself comes first"
        assert first.logprob == pytest.approx(row[token].item(), abs=1e-4)
        assert first.rank == int((row > row[token]).sum().item()) + 1
        top_ids = row.topk(num_top).indices.tolist()
        ranked = {token_id: logprob.rank for token_id, logprob in entry.items() if token_id != token}
        assert set(ranked) <= set(top_ids) and len(entry) in (num_top, num_top + 1)
        for rank, token_id in enumerate(top_ids, start=1):
            assert entry[token_id].logprob == pytest.approx(row[token_id].item(), abs=1e-4)
            if token_id != token:
                assert entry[token_id].rank == rank


@pytest.mark.parametrize("decode_lookahead", [False, True], ids=["plain", "lookahead"])
def test_prompt_logprobs_equal_transformers_log_softmax(checkpoint, decode_lookahead):
    directory, model = checkpoint
    llm = LLM(model=str(directory), **_engine_options(decode_lookahead=decode_lookahead, max_num_batched_tokens=16))
    prompts = [_prompt_ids(seed, length) for seed, length in ((0, 9), (1, 37), (2, 2))]
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=NUM_TOP)
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in prompts], params, use_tqdm=False)
    for output, ids in zip(outputs, prompts):
        _check_against_transformers(output.prompt_logprobs, ids, _transformers_prompt_logprobs(model, ids))
    plain = llm.generate([{"prompt_token_ids": prompts[0]}], params.clone(prompt_logprobs=None), use_tqdm=False)[0]
    assert plain.prompt_logprobs is None
    assert plain.outputs[0].token_ids == outputs[0].outputs[0].token_ids, "scoring the prompt changes no token"


def test_prompt_logprobs_survive_chunking_prefix_hits_and_preemption(checkpoint):
    directory, model = checkpoint
    ids = _prompt_ids(3, 45)
    expected = _transformers_prompt_logprobs(model, ids)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=NUM_TOP)
    # 16-token steps cut the prompt into chunks; the second call finds its blocks cached and must score them anyway.
    chunked = LLM(model=str(directory), **_engine_options(max_num_batched_tokens=16))
    for _ in range(2):
        output = chunked.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
        _check_against_transformers(output.prompt_logprobs, ids, expected)
    assert chunked.llm_engine.block_manager.num_free_blocks == chunked.llm_engine.block_manager.num_blocks

    # So few blocks that long requests preempt each other and recompute: nothing scored twice or lost.
    block_bytes = 2 * 2 * 4 * 2 * 8 * 4  # k and v x layers x block size x KV heads x head size x float32
    tight = LLM(model=str(directory), **_engine_options(kv_cache_memory_bytes=40 * block_bytes,
                                                        max_num_batched_tokens=32, max_model_len=128))
    others = [{"prompt_token_ids": _prompt_ids(seed, 40)} for seed in range(10, 13)]
    long_params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    outputs = tight.generate(others + [{"prompt_token_ids": ids}], [long_params] * 3 + [params.clone(max_tokens=60)],
                             use_tqdm=False)
    assert tight.llm_engine.core.scheduler.num_preemptions > 0, "the test must make preemption happen"
    _check_against_transformers(outputs[-1].prompt_logprobs, ids, expected)


def test_prompt_logprobs_with_n_samples_and_delta_outputs(checkpoint):
    directory, model = checkpoint
    ids = _prompt_ids(4, 21)
    expected = _transformers_prompt_logprobs(model, ids)
    llm = LLM(model=str(directory), **_engine_options())
    output = llm.generate([{"prompt_token_ids": ids}],
                          SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=5, prompt_logprobs=0),
                          use_tqdm=False)[0]
    assert len(output.outputs) == 3
    _check_against_transformers(output.prompt_logprobs, ids, expected, num_top=0)

    engine: LLMEngine = llm.llm_engine
    engine.add_request("delta", {"prompt_token_ids": ids},
                       SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, prompt_logprobs=NUM_TOP,
                                      output_kind=RequestOutputKind.DELTA))
    carried = []
    while engine.has_unfinished_requests():
        carried += [out.prompt_logprobs for out in engine.step() if out.prompt_logprobs is not None]
    assert len(carried) == 1, "a DELTA stream carries the prompt logprobs once"
    _check_against_transformers(carried[0], ids, expected)


def test_prompt_logprobs_must_be_a_non_negative_integer():
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
