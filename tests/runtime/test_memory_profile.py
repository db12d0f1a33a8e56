"""Sizing the GPU KV cache from a measured worst-case step (CUDA only) and its validation."""

from __future__ import annotations

import gc

import pytest
import torch

from joule.runtime.memory_profile import gpu_kv_cache_budget, profile_step_memory

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_profile_refuses_a_non_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        profile_step_memory(None, None, torch.device("cpu"), torch.float32, 1, 1, 8, 16, 32, 4, 100)


@needs_cuda
def test_budget_rejects_bad_utilization():
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        gpu_kv_cache_budget(torch.device("cuda"), 1.5, 0)


@needs_cuda
def test_engine_profiles_then_sizes_the_cache(tmp_path):
    from helpers.tiny_models import build_tiny_checkpoint
    from joule.llm_engine import LLMEngine

    build_tiny_checkpoint("llama-gqa4-tied", tmp_path)
    path = tmp_path
    small = LLMEngine.from_kwargs(model=str(path), dtype="float32", gpu_memory_utilization=0.3).kv_capacity_tokens
    # On a GPU the first engine's cache counts as used memory until it is gone (the budget is a share of the
    # device, what others hold included): free it before sizing the second.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    large = LLMEngine.from_kwargs(model=str(path), dtype="float32", gpu_memory_utilization=0.5).kv_capacity_tokens
    assert 0 < small < large
