"""``LLM.reset_prefix_cache`` (vLLM's call): later prompts find nothing cached; refused while requests run."""

from __future__ import annotations

import pytest
from helpers.tiny_models import build_tiny_checkpoint

from joule import LLM, SamplingParams

PROMPT = {"prompt_token_ids": list(range(10, 34))}  # six 4-token blocks
PARAMS = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    directory = tmp_path_factory.mktemp("reset-tiny-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return LLM(model=str(directory), max_model_len=128, kv_cache_memory_bytes=2 * 2**20, dtype="float32",
               block_size=4)


def cached_tokens(llm: LLM) -> int:
    return llm.generate(PROMPT, PARAMS, use_tqdm=False)[0].num_cached_tokens


def test_after_a_reset_the_same_prompt_finds_nothing_cached(llm):
    cached_tokens(llm)
    assert cached_tokens(llm) >= 20
    assert llm.reset_prefix_cache() is True
    assert cached_tokens(llm) == 0
    assert cached_tokens(llm) >= 20  # and it caches again


def test_a_reset_is_refused_while_a_request_is_unfinished(llm):
    cached_tokens(llm)
    engine = llm.llm_engine
    engine.add_request("running", {"prompt_token_ids": [5, 6, 7]}, PARAMS)
    assert llm.reset_prefix_cache() is False
    while engine.has_unfinished_requests():
        engine.step()
    assert cached_tokens(llm) >= 20  # the refused reset forgot nothing
