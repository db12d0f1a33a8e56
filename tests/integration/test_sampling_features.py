"""Sampling features end to end on a tiny model: seeds, stop ids, n > 1, logprobs, bad input, aborts."""

from __future__ import annotations

import random

import pytest
import torch
from helpers.tiny_models import build_tiny_checkpoint

from joule import LLM, SamplingParams
from joule.llm_engine import LLMEngine


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-sampling")
    model = build_tiny_checkpoint("llama-gqa4-tied", directory)
    return directory, model


@pytest.fixture(scope="module")
def llm(checkpoint):
    directory, _ = checkpoint
    return LLM(model=str(directory), dtype="float32", device="cpu", block_size=4, max_model_len=256,
               kv_cache_memory_bytes=4 << 20, max_num_batched_tokens=64)


def _prompt(seed: int, length: int = 9) -> dict:
    generator = random.Random(seed)
    return {"prompt_token_ids": [generator.randrange(3, 211) for _ in range(length)]}


def test_seeded_sampling_is_independent_of_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([_prompt(0)], params, use_tqdm=False)[0].outputs[0].token_ids
    neighbours = [_prompt(seed) for seed in range(1, 12)]
    unseeded = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate(neighbours[:5] + [_prompt(0)] + neighbours[5:], [unseeded] * 5 + [params] + [unseeded] * 6,
                         use_tqdm=False)
    assert mixed[5].outputs[0].token_ids == alone
    other_seed = llm.generate([_prompt(0)], params.clone(seed=99), use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_stop_token_ids_end_generation(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = llm.generate([_prompt(3)], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_token = reference[4]
    first = reference.index(stop_token)
    output = llm.generate([_prompt(3)], greedy.clone(stop_token_ids=[stop_token]), use_tqdm=False)[0].outputs[0]
    assert output.token_ids == reference[: first + 1]
    assert output.finish_reason == "stop" and output.stop_reason == stop_token


def test_min_tokens_delays_stop_ids(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    reference = llm.generate([_prompt(3)], greedy, use_tqdm=False)[0].outputs[0].token_ids
    stop_token = reference[0]
    output = llm.generate([_prompt(3)], greedy.clone(stop_token_ids=[stop_token], min_tokens=3), use_tqdm=False)
    tokens = output[0].outputs[0].token_ids
    assert len(tokens) >= 4 and stop_token not in tokens[:3]


def test_n_samples_share_prompt_blocks(llm):
    engine = llm.llm_engine
    hits_before = engine.block_manager.prefix_cache_hits
    prompt = _prompt(5, length=33)
    output = llm.generate([prompt], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0]
    assert [completion.index for completion in output.outputs] == [0, 1, 2, 3]
    assert all(len(completion.token_ids) == 10 for completion in output.outputs)
    assert len({tuple(completion.token_ids) for completion in output.outputs}) > 1
    # Three later samples reuse the first one's 8 full prompt blocks (32 tokens).
    assert engine.block_manager.prefix_cache_hits - hits_before >= 3 * 32
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_logprobs_equal_transformers_log_softmax(llm, checkpoint):
    _, model = checkpoint
    prompt = _prompt(8)
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    sequence = prompt["prompt_token_ids"] + output.token_ids
    with torch.no_grad():
        logits = model(torch.tensor([sequence])).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    start = len(prompt["prompt_token_ids"]) - 1
    total = 0.0
    for step, (token_id, entry) in enumerate(zip(output.token_ids, output.logprobs)):
        row = reference[start + step]
        assert token_id in entry
        assert abs(entry[token_id].logprob - row[token_id].item()) < 1e-4
        top_ids = torch.topk(row, 5).indices.tolist()
        by_rank = sorted(entry.items(), key=lambda item: item[1].rank)
        assert [token for token, _ in by_rank][:5] == top_ids
        for token in top_ids:
            assert abs(entry[token].logprob - row[token].item()) < 1e-4
        total += row[token_id].item()
    assert abs(output.cumulative_logprob - total) < 1e-3


def test_bad_prompts_fail_alone(llm):
    good = _prompt(1)
    outputs = llm.generate(
        [good, {"prompt_token_ids": []}, {"prompt_token_ids": [5] * 300}, {"prompt_token_ids": [10_000]}, good],
        SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    assert outputs[0].error is None and len(outputs[0].outputs[0].token_ids) == 4
    assert outputs[4].outputs[0].token_ids == outputs[0].outputs[0].token_ids
    assert isinstance(outputs[1].error, ValueError) and "prompt" in str(outputs[1].error)
    assert isinstance(outputs[2].error, ValueError) and "max_model_len" in str(outputs[2].error)
    assert isinstance(outputs[3].error, ValueError) and "prompt_token_ids" in str(outputs[3].error)


def test_abort_frees_blocks_at_once(checkpoint):
    directory, _ = checkpoint
    engine = LLMEngine.from_kwargs(model=str(directory), dtype="float32", device="cpu", block_size=4,
                                   kv_cache_memory_bytes=1 << 20, max_model_len=128)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    for index in range(3):
        engine.add_request(f"r{index}", _prompt(index, length=20), params)
    for _ in range(3):
        engine.step()
    used = engine.block_manager.num_used_blocks
    assert used > 0
    engine.abort_request("r1")
    assert engine.block_manager.num_used_blocks < used
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_streaming_delta_outputs_concatenate_to_final(checkpoint):
    directory, _ = checkpoint
    from joule.sampling_params import RequestOutputKind

    engine = LLMEngine.from_kwargs(model=str(directory), dtype="float32", device="cpu", block_size=4,
                                   kv_cache_memory_bytes=1 << 20, max_model_len=128)
    engine.add_request("d", _prompt(2), SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True,
                                                       output_kind=RequestOutputKind.DELTA))
    engine.add_request("c", _prompt(2), SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))
    pieces, final = [], None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == "d":
                pieces.extend(output.outputs[0].token_ids)
            elif output.finished:
                final = output.outputs[0].token_ids
    assert pieces == final and len(final) == 9


def test_request_metrics_are_ordered(llm):
    output = llm.generate([_prompt(4)], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True),
                          use_tqdm=False)[0]
    metrics = output.metrics
    assert metrics.arrival_time <= metrics.first_scheduled_time <= metrics.first_token_time
    assert metrics.first_token_time <= metrics.last_token_time <= metrics.finished_time
    assert metrics.time_in_queue >= 0
    assert metrics.time_to_first_token > 0 and metrics.end_to_end_latency >= metrics.time_to_first_token


@pytest.mark.parametrize("kind", ["delta", "cumulative"])
def test_streamed_cumulative_logprob_is_the_sum_so_far(checkpoint, kind):
    """Every streamed output's cumulative_logprob is exactly sum() of the logprobs of the tokens so far (the
    engine keeps a running sum instead of re-adding the history each step)."""
    from joule.sampling_params import RequestOutputKind

    directory, _ = checkpoint
    engine = LLMEngine.from_kwargs(model=str(directory), dtype="float32", device="cpu", block_size=4,
                                   kv_cache_memory_bytes=4 << 20)
    params = SamplingParams(temperature=0.8, seed=5, max_tokens=9, ignore_eos=True, logprobs=2,
                            output_kind=RequestOutputKind(kind))
    engine.add_request("r", _prompt(3), params)
    logprobs, checked = [], 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            completion = output.outputs[0]
            new = completion.logprobs if kind == "delta" else completion.logprobs[len(logprobs):]
            new_ids = completion.token_ids if kind == "delta" else completion.token_ids[len(logprobs):]
            logprobs.extend(entry[token_id].logprob for entry, token_id in zip(new, new_ids))
            assert completion.cumulative_logprob == sum(logprobs)
            checked += 1
    assert checked >= 9 and len(logprobs) == 9


def test_logit_bias_steers_greedy_and_sampled_tokens(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    reference = llm.generate([_prompt(8)], greedy, use_tqdm=False)[0].outputs[0].token_ids
    forced = llm.generate([_prompt(8)], greedy.clone(logit_bias={17: 100.0}), use_tqdm=False)[0]
    assert forced.outputs[0].token_ids == [17] * 6
    avoided = llm.generate([_prompt(8)], greedy.clone(logit_bias={reference[0]: -100.0}), use_tqdm=False)[0]
    assert avoided.outputs[0].token_ids[0] != reference[0]
    sampled = SamplingParams(temperature=1.0, seed=3, max_tokens=4, ignore_eos=True, logit_bias={"23": 100})
    assert llm.generate([_prompt(8)], sampled, use_tqdm=False)[0].outputs[0].token_ids == [23] * 4
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={5: 250.0})
    bad = llm.generate([_prompt(8), _prompt(9)], [greedy.clone(logit_bias={10**6: 1.0}), greedy], use_tqdm=False)
    assert "logit_bias" in str(bad[0].error) and bad[1].outputs[0].token_ids


def test_truncate_prompt_tokens_keeps_the_last_tokens(llm):
    prompt = _prompt(11, length=30)
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
    cut = llm.generate([prompt], params.clone(truncate_prompt_tokens=7), use_tqdm=False)[0]
    tail = llm.generate([{"prompt_token_ids": prompt["prompt_token_ids"][-7:]}], params, use_tqdm=False)[0]
    assert cut.prompt_token_ids == prompt["prompt_token_ids"][-7:]
    assert cut.outputs[0].token_ids == tail.outputs[0].token_ids
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        SamplingParams(truncate_prompt_tokens=0)


def test_allowed_token_ids_limit_what_is_drawn(llm):
    allowed = [5, 17, 99]
    greedy = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, allowed_token_ids=allowed)
    sampled = SamplingParams(temperature=1.5, seed=2, max_tokens=12, ignore_eos=True, allowed_token_ids=allowed)
    plain = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outputs = llm.generate([_prompt(12)] * 3, [greedy, sampled, plain], use_tqdm=False)
    assert set(outputs[0].outputs[0].token_ids) <= set(allowed) and set(outputs[1].outputs[0].token_ids) <= set(allowed)
    assert len(set(outputs[1].outputs[0].token_ids)) > 1, "sampling still chooses among them"
    alone = llm.generate([_prompt(12)], plain, use_tqdm=False)[0]
    assert outputs[2].outputs[0].token_ids == alone.outputs[0].token_ids, "neighbours are not restricted"
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[])
    bad = llm.generate([_prompt(12)], [plain.clone(allowed_token_ids=[10**6])], use_tqdm=False)[0]
    assert "allowed_token_ids" in str(bad.error)
