"""Who writes the KV cache: the Triton backend lets the model's rotary kernel do it, the portable one never."""

from __future__ import annotations

import pytest
import torch

from joule.runtime.attention.base import AttentionMetadata, ForwardContext, KVCache
from joule.runtime.attention.portable import PortableAttentionBackend


def _context(backend) -> ForwardContext:
    cache = KVCache.allocate(2, 4, 8, 2, 16, torch.float32, "cpu")
    metadata = AttentionMetadata(
        query_start_locations=torch.tensor([0, 1]), slot_mapping=torch.tensor([3]),
        block_tables=torch.zeros(1, 1, dtype=torch.int32), query_lengths=[1], context_lengths=[3],
        sequence_lengths=[4],
    )
    return ForwardContext(backend, cache, metadata)


def test_portable_backend_writes_the_cache_itself():
    context = _context(PortableAttentionBackend())
    assert context.kv_destination(1) is None
    query, key = torch.randn(1, 4, 16), torch.randn(1, 2, 16)
    with pytest.raises(ValueError, match="kv_stored"):
        context.attend(1, query, key, key, 0.25, kv_stored=True)


def test_triton_backend_hands_out_the_layer_cache_and_slots():
    pytest.importorskip("triton", reason="triton is not installed")
    from joule.runtime.attention.triton_backend import TritonAttentionBackend

    context = _context(TritonAttentionBackend())
    key_cache, value_cache, slots = context.kv_destination(1)
    assert key_cache is context.kv_cache.key_caches[1] and value_cache is context.kv_cache.value_caches[1]
    assert slots is context.metadata.slot_mapping
