"""Rotary (+ q/k norm) and SiLU-and-mul kernels against their references, on strided views like the model's."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.activation import silu_and_mul  # noqa: E402
from joule.kernels.reference import rotary_reference, silu_and_mul_reference  # noqa: E402
from joule.kernels.rotary import rotary_embedding_  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}


def _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, generator):
    """q and k as slices of one fused projection output, as the model hands them over."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    fused = (torch.randn(num_tokens, width, generator=generator) * 2).to(DEVICE, dtype)
    query, key, _ = fused.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    return fused, query.view(num_tokens, num_heads, head_dim), key.view(num_tokens, num_kv_heads, head_dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 2, 64), (6, 1, 32), (3, 3, 24)])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rotary_matches_reference(dtype, num_heads, num_kv_heads, head_dim, with_norm):
    generator = torch.Generator().manual_seed(head_dim + num_heads)
    num_tokens = 5
    fused, query, key = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype, generator)
    angles = torch.rand(num_tokens, head_dim // 2, generator=generator) * 50
    # Views of one [T, 2, D/2] gather, as RotaryEmbedding hands them over (rows D apart).
    table = torch.stack((angles.cos(), angles.sin()), dim=1).to(DEVICE)
    cos, sin = table[:, 0], table[:, 1]
    norms = (None, None)
    if with_norm:
        norms = tuple((1 + 0.2 * torch.randn(head_dim, generator=generator)).to(DEVICE, dtype) for _ in range(2))
    expected_query, expected_key = rotary_reference(query, key, cos, sin, *norms, eps=1e-6)
    value_before = fused[:, (num_heads + num_kv_heads) * head_dim:].clone()
    rotary_embedding_(query, key, cos, sin, *norms, eps=1e-6)
    torch.testing.assert_close(query.float(), expected_query.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    torch.testing.assert_close(key.float(), expected_key.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    assert torch.equal(fused[:, (num_heads + num_kv_heads) * head_dim:], value_before)  # values untouched


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("with_norm", [False, True])
def test_rotary_with_cache_writes_what_rotary_then_write_kv_cache_writes(cache_dtype, head_major, with_norm):
    """The fused cache write: rotated keys and the values land in each token's slot exactly as the two
    separate kernels put them there; a negative slot (padding) writes nothing; queries rotate in place."""
    from joule.kernels.kv_write import write_kv_cache
    from joule.runtime.attention.base import KVCache

    generator = torch.Generator().manual_seed(3 + with_norm)
    num_tokens, num_heads, num_kv_heads, head_dim = 4, 4, 2, 32
    fused, query, key = _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, torch.bfloat16, generator)
    fused[0, -8:] = 600.0  # beyond fp8's range: saturates like write_kv_cache
    value = fused[:, (num_heads + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    angles = torch.rand(num_tokens, head_dim // 2, generator=generator) * 50
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    norms = (None, None)
    if with_norm:
        norms = tuple((1 + 0.2 * torch.randn(head_dim, generator=generator)).to(DEVICE, torch.bfloat16)
                      for _ in range(2))
    slots = torch.tensor([5, 17, -1, 2], device=DEVICE)
    caches = [KVCache.allocate(1, 3, 8, num_kv_heads, head_dim, cache_dtype, DEVICE, head_major=head_major)
              for _ in range(2)]
    separate_query, separate_key = query.clone(), key.clone()
    rotary_embedding_(separate_query, separate_key, cos, sin, *norms, eps=1e-6)
    write_kv_cache(separate_key, value, caches[0].key_caches[0], caches[0].value_caches[0], slots)
    key_before = key.clone()
    rotary_embedding_(query, key, cos, sin, *norms, eps=1e-6,
                      cache=(value, caches[1].key_caches[0], caches[1].value_caches[0], slots))
    assert torch.equal(query, separate_query) and torch.equal(key, key_before)
    for expected, written in ((caches[0].key_caches[0], caches[1].key_caches[0]),
                              (caches[0].value_caches[0], caches[1].value_caches[0])):
        assert torch.equal(expected.float(), written.float())
        assert written.float().abs().sum() > 0
    assert caches[1].key_caches[0].flatten(0, 1)[[0, 1, 3, 4]].float().abs().sum() == 0  # untouched slots


def test_rotary_rejects_bad_tables():
    query = torch.randn(3, 2, 8, device=DEVICE)
    key = torch.randn(3, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="cos/sin"):
        rotary_embedding_(query, key, torch.ones(3, 8, device=DEVICE), torch.ones(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match="norm weights"):
        rotary_embedding_(query, key, torch.ones(3, 4, device=DEVICE), torch.ones(3, 4, device=DEVICE),
                          torch.ones(8, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("intermediate", [48, 1536, 2500])
def test_silu_and_mul_matches_reference(dtype, intermediate):
    generator = torch.Generator().manual_seed(intermediate)
    gate_up = (torch.randn(4, 2 * intermediate, generator=generator) * 3).to(DEVICE, dtype)
    torch.testing.assert_close(silu_and_mul(gate_up).float(), silu_and_mul_reference(gate_up).float(),
                               atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_silu_and_mul_rejects_odd_width():
    with pytest.raises(ValueError, match="2I"):
        silu_and_mul(torch.randn(2, 7, device=DEVICE))
