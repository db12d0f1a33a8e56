"""Greedy outputs are token-identical to transformers in float32, whatever the engine settings."""

from __future__ import annotations

import random

import pytest

from joule import LLM, SamplingParams

from helpers.tiny_models import build_tiny_checkpoint, transformers_greedy

PROMPT_LENGTHS = [1, 3, 4, 5, 16, 17, 40, 63]
NEW_TOKENS = 12

ENGINE_SETTINGS = {
    "default": dict(block_size=16),
    "no-prefix-cache": dict(block_size=16, enable_prefix_caching=False),
    "chunked-16": dict(block_size=4, max_num_batched_tokens=16),
    "preemption": dict(block_size=4, max_num_batched_tokens=32, max_model_len=80, kv_bytes_blocks=24),
    "batch-1": dict(block_size=8, max_num_seqs=1),
}


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    generator = random.Random(seed)
    prompts = [[generator.randrange(3, vocab_size) for _ in range(length)] for length in PROMPT_LENGTHS]
    prompts.append(prompts[6][:20] + [5, 6, 7])  # shares a prefix with another prompt
    return prompts


def _make_llm(directory, settings: dict) -> LLM:
    settings = dict(settings)
    blocks = settings.pop("kv_bytes_blocks", 4096)
    from joule.model.config import ModelConfig

    config = ModelConfig.from_file(directory / "config.json")
    block_bytes = 2 * config.num_hidden_layers * settings["block_size"] * config.num_key_value_heads * config.head_dim * 4
    return LLM(model=str(directory), dtype="float32", device="cpu", kv_cache_memory_bytes=blocks * block_bytes, **settings)


@pytest.fixture(scope="module")
def references(tiny_checkpoint):
    name, directory, model = tiny_checkpoint
    prompts = _prompts(model.config.vocab_size)
    return name, directory, prompts, [transformers_greedy(model, prompt, NEW_TOKENS) for prompt in prompts]


@pytest.mark.parametrize("setting", list(ENGINE_SETTINGS))
def test_greedy_tokens_match_transformers(references, setting):
    name, directory, prompts, expected = references
    llm = _make_llm(directory, ENGINE_SETTINGS[setting])
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False)
    for prompt, output, reference in zip(prompts, outputs, expected):
        assert output.outputs[0].token_ids == reference, f"{name}/{setting}: prompt of {len(prompt)} tokens"
    if setting == "preemption":
        assert llm.llm_engine.core.scheduler.num_preemptions > 0
    engine = llm.llm_engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    # A second call hits the prefix cache and still gives the same tokens.
    again = llm.generate([{"prompt_token_ids": prompt} for prompt in prompts], params, use_tqdm=False)
    assert [output.outputs[0].token_ids for output in again] == expected
    if ENGINE_SETTINGS[setting].get("enable_prefix_caching", True) and setting != "preemption":
        assert sum(output.num_cached_tokens for output in again) > 0


def test_batch_of_64_matches_transformers(tmp_path):
    directory = tmp_path / "llama"
    model = build_tiny_checkpoint("llama-gqa4-tied", directory)
    generator = random.Random(7)
    prompts = [[generator.randrange(3, 211) for _ in range(generator.randint(1, 50))] for _ in range(64)]
    expected = [transformers_greedy(model, prompt, 8) for prompt in prompts]
    llm = _make_llm(directory, dict(block_size=16, max_num_seqs=64))
    outputs = llm.generate(
        [{"prompt_token_ids": prompt} for prompt in prompts],
        SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
        use_tqdm=False,
    )
    assert [output.outputs[0].token_ids for output in outputs] == expected
