"""kv_cache_dtype="fp8": a quarter of float32's bytes per token, and greedy tokens close to float32's.

fp8 (e4m3) keeps 3 mantissa bits, so exact equality with transformers is not expected; the tiny
model's greedy continuations must still mostly agree with the float32 cache's.
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers.tiny_models import build_tiny_checkpoint

from joule import LLM, SamplingParams


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-fp8-kv")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return directory


def test_fp8_cache_holds_four_times_the_tokens_and_keeps_greedy_tokens_close(checkpoint):
    generator = random.Random(5)
    prompts = [{"prompt_token_ids": [generator.randrange(3, 211) for _ in range(length)]} for length in (3, 20, 45)]
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    results = {}
    for kv_dtype in ("auto", "fp8"):
        llm = LLM(model=str(checkpoint), dtype="float32", device="cpu", kv_cache_memory_bytes=1 << 22,
                  kv_cache_dtype=kv_dtype, block_size=8)
        engine = llm.llm_engine
        results[kv_dtype] = ([output.outputs[0].token_ids for output in llm.generate(prompts, params, use_tqdm=False)],
                             engine.kv_capacity_tokens, engine.kv_cache.key_caches[0].dtype)
    (full_tokens, full_capacity, full_dtype), (fp8_tokens, fp8_capacity, fp8_dtype) = results["auto"], results["fp8"]
    assert full_dtype == torch.float32 and fp8_dtype == torch.float8_e4m3fn
    assert fp8_capacity == 4 * full_capacity
    assert [tokens[0] for tokens in fp8_tokens] == [tokens[0] for tokens in full_tokens]
    agreeing = sum(a == b for full, fp8 in zip(full_tokens, fp8_tokens) for a, b in zip(full, fp8))
    assert agreeing >= 0.8 * sum(len(tokens) for tokens in full_tokens)


def test_unknown_kv_cache_dtype_names_the_field(checkpoint):
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        LLM(model=str(checkpoint), dtype="float32", device="cpu", kv_cache_dtype="int3")
