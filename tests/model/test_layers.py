"""The CPU building blocks round exactly like Hugging Face's float32 reference formulas."""

from __future__ import annotations

import torch

from joule.model.layers import RMSNorm, apply_rotary, whole_head_tables


def reference_rms_norm(hidden, weight, eps):
    """Hugging Face's LlamaRMSNorm, operation by operation."""
    hidden32 = hidden.float()
    variance = hidden32.pow(2).mean(-1, keepdim=True)
    return weight * (hidden32 * torch.rsqrt(variance + eps)).to(hidden.dtype)


def reference_rotary(x, cos, sin):
    """Hugging Face's apply_rotary_pos_emb with rotate_half, for half tables ``[T, D/2]``."""
    cos = torch.cat((cos, cos), dim=-1).unsqueeze(1)
    sin = torch.cat((sin, sin), dim=-1).unsqueeze(1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin


def test_rms_norm_float32_is_bit_identical_to_reference():
    generator = torch.Generator().manual_seed(0)
    norm = RMSNorm(96, eps=1e-5)
    norm.weight.data = torch.randn(96, generator=generator)
    for rows in (1, 7, 64):
        hidden = torch.randn(rows, 96, generator=generator) * 4
        assert torch.equal(norm(hidden), reference_rms_norm(hidden, norm.weight, 1e-5))


def test_rms_norm_with_residual_returns_the_sum_and_its_norm():
    generator = torch.Generator().manual_seed(1)
    norm = RMSNorm(32, eps=1e-6)
    hidden, residual = torch.randn(5, 32, generator=generator), torch.randn(5, 32, generator=generator)
    output, new_residual = norm(hidden, residual)
    assert torch.equal(new_residual, hidden + residual)
    assert torch.equal(output, reference_rms_norm(hidden + residual, norm.weight, 1e-6))


def test_rms_norm_bfloat16_keeps_float32_statistics():
    generator = torch.Generator().manual_seed(2)
    norm = RMSNorm(64, eps=1e-5).to(torch.bfloat16)
    hidden = (torch.randn(9, 64, generator=generator) * 3).to(torch.bfloat16)
    output = norm(hidden)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, reference_rms_norm(hidden, norm.weight, 1e-5))


def test_rotary_on_strided_view_is_bit_identical_to_reference():
    generator = torch.Generator().manual_seed(3)
    tokens, heads, head_dim = 6, 5, 16
    angles = torch.rand(tokens, head_dim // 2, generator=generator) * 50
    cos, sin = angles.cos(), angles.sin()
    # As the model passes it: q and k heads as a column slice of a wider merged projection.
    merged = torch.randn(tokens, (heads + 2) * head_dim, generator=generator)
    x = merged[:, : heads * head_dim].view(tokens, heads, head_dim)
    rotated = apply_rotary(x, *whole_head_tables(cos, sin, torch.float32))
    assert torch.equal(rotated, reference_rotary(x, cos, sin))
    assert torch.equal(x, merged[:, : heads * head_dim].view(tokens, heads, head_dim))  # input untouched
