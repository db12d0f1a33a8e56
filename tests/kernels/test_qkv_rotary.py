"""The fused batch-1 q/k/v kernel against the unfused kernels it replaces: norm + GEMV, then rotary with the
cache write. Under the interpreter they agree bit for bit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.gemv import GemvConfig, gemv  # noqa: E402
from joule.kernels.qkv_rotary import qkv_rotary_gemv  # noqa: E402
from joule.kernels.rotary import rotary_embedding_  # noqa: E402
from joule.runtime.attention.base import KVCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("with_residual,with_bias", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("slot", [21, -1])  # -1: a padding row writes no cache slot
@pytest.mark.parametrize("l2_prefetch", ["0", "1"])  # JOULE_GEMV_L2_PREFETCH: takes effect on a GPU under PDL only
@pytest.mark.parametrize("head_columns", ["", "128"])  # JOULE_GEMV_HEAD_COLUMNS: the whole padded row before the wait
def test_qkv_rotary_matches_norm_gemv_then_rotary_with_cache(cache_dtype, with_residual, with_bias, slot,
                                                             l2_prefetch, head_columns, monkeypatch):
    monkeypatch.setenv("JOULE_GEMV_L2_PREFETCH", l2_prefetch)
    monkeypatch.setenv("JOULE_GEMV_HEAD_COLUMNS", head_columns)
    generator = torch.Generator().manual_seed(31 + with_residual + 2 * with_bias)
    num_heads, num_kv_heads, head_dim, hidden_size = 4, 2, 16, 96
    rows = (num_heads + 2 * num_kv_heads) * head_dim
    weight = (torch.randn(rows, hidden_size, generator=generator) * 0.3).to(DEVICE, torch.bfloat16)
    bias = torch.randn(rows, generator=generator).to(DEVICE, torch.bfloat16) if with_bias else None
    hidden = torch.randn(1, hidden_size, generator=generator).to(DEVICE, torch.bfloat16)
    residual = torch.randn(1, hidden_size, generator=generator).to(DEVICE, torch.bfloat16) if with_residual else None
    norm_weight = (1 + 0.1 * torch.randn(hidden_size, generator=generator)).to(DEVICE, torch.bfloat16)
    angles = torch.rand(1, head_dim // 2, generator=generator) * 40
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    slots = torch.tensor([slot], device=DEVICE)
    caches = [KVCache.allocate(1, 3, 8, num_kv_heads, head_dim, cache_dtype, DEVICE) for _ in range(2)]

    # Unfused: norm + GEMV (same 32-column tiles), then rotary writing the cache.
    result = gemv(hidden, weight, bias, config=GemvConfig(4, 32, 4, 1, prefetch_tiles=1), norm_weight=norm_weight,
                  eps=1e-5, residual=residual)
    qkv, expected_residual = result if with_residual else (result, None)
    query, key, value = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=1)
    query, key, value = (part.view(1, -1, head_dim) for part in (query, key, value))
    rotary_embedding_(query, key, cos, sin, cache=(value, caches[0].key_caches[0], caches[0].value_caches[0], slots))

    fused_query, fused_residual = qkv_rotary_gemv(
        hidden, weight, bias, cos, sin, caches[1].key_caches[0], caches[1].value_caches[0], slots, num_heads,
        norm_weight=norm_weight, eps=1e-5, residual=residual, pairs=4, block_k=32)
    assert torch.equal(fused_query.view(1, num_heads, head_dim), query)
    if with_residual:
        assert torch.equal(fused_residual, expected_residual)
    else:
        assert fused_residual is None
    for expected, written in ((caches[0].key_caches[0], caches[1].key_caches[0]),
                              (caches[0].value_caches[0], caches[1].value_caches[0])):
        assert torch.equal(expected.float(), written.float())
        assert (written.float().abs().sum() > 0) == (slot >= 0)


def test_qkv_rotary_rejects_bad_shapes():
    cache = KVCache.allocate(1, 2, 4, 2, 8, torch.float32, DEVICE)
    hidden, cos = torch.ones(1, 16, device=DEVICE), torch.ones(1, 4, device=DEVICE)
    slots = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="weight must be"):
        qkv_rotary_gemv(hidden, torch.ones(10, 16, device=DEVICE), None, cos, cos, cache.key_caches[0],
                        cache.value_caches[0], slots, 2)
    with pytest.raises(ValueError, match="pairs"):
        qkv_rotary_gemv(hidden, torch.ones(48, 16, device=DEVICE), None, cos, cos, cache.key_caches[0],
                        cache.value_caches[0], slots, 2, pairs=3)
