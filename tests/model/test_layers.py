"""The CPU building blocks round exactly like Hugging Face's float32 reference formulas."""

from __future__ import annotations

import pytest
import torch

from joule.model.layers import RMSNorm, apply_rotary, onednn_packs_weights, whole_head_tables


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


def _projection_and_norm(device, dtype, out_features=24, in_features=32, seed=5):
    from joule.model.layers import MergedLinear

    generator = torch.Generator().manual_seed(seed)
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    linear.weight.data = torch.randn(out_features, in_features, generator=generator) * 0.2
    projection = MergedLinear([linear], transpose_weight=False).to(device, dtype)
    norm = RMSNorm(in_features, eps=1e-5)
    norm.weight.data = 1 + 0.1 * torch.randn(in_features, generator=generator)
    return projection, norm.to(device, dtype), generator


@torch.inference_mode()  # as the engine runs the model
def test_norm_then_project_is_the_norm_then_the_projection_on_cpu():
    from joule.model.layers import norm_then_project, swiglu

    projection, norm, generator = _projection_and_norm("cpu", torch.float32)
    hidden, residual = torch.randn(3, 32, generator=generator), torch.randn(3, 32, generator=generator)
    output, new_residual = norm_then_project(projection, norm, hidden, residual)
    normed, expected_residual = norm(hidden, residual)
    assert torch.equal(new_residual, expected_residual) and torch.equal(output, projection(normed))
    output, new_residual = norm_then_project(projection, norm, hidden, None, gated=True)  # the first layer
    assert new_residual is hidden and torch.equal(output, swiglu(projection(norm(hidden))))
    gate, up = projection(norm(hidden)).chunk(2, dim=-1)
    torch.testing.assert_close(output, torch.nn.functional.silu(gate) * up, atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_residual", [False, True])
@torch.inference_mode()
def test_one_cuda_row_fuses_the_norm_into_the_gemv(gated, with_residual):
    """One row runs the fused Triton GEMV; the same row inside a two-row batch runs norm, GEMM, activation."""
    from joule.model.layers import norm_then_project

    projection, norm, generator = _projection_and_norm("cuda", torch.bfloat16, seed=6 + gated)
    hidden = torch.randn(2, 32, generator=generator).to("cuda", torch.bfloat16)
    residual = torch.randn(2, 32, generator=generator).to("cuda", torch.bfloat16) if with_residual else None
    assert projection.runs_row_gemv(hidden[:1]) and not projection.runs_row_gemv(hidden)
    one_row, one_residual = norm_then_project(projection, norm, hidden[:1],
                                              None if residual is None else residual[:1], gated=gated)
    two_rows, two_residuals = norm_then_project(projection, norm, hidden, residual, gated=gated)
    assert torch.equal(one_residual, two_residuals[:1])
    torch.testing.assert_close(one_row.float(), two_rows[:1].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_projection_gives_the_plain_projections_values(dtype, bias):
    if not onednn_packs_weights(torch.device("cpu"), dtype):
        pytest.skip(f"oneDNN has no {dtype} on this CPU")
    from joule.model.layers import MergedLinear

    generator = torch.Generator().manual_seed(11)
    linears = [torch.nn.Linear(48, out, bias=bias) for out in (40, 24)]
    for linear in linears:
        linear.weight.data = torch.randn(linear.weight.shape, generator=generator)
        if bias:
            linear.bias.data = torch.randn(linear.bias.shape, generator=generator)
    plain = MergedLinear(linears, transpose_weight=False).to(dtype)
    packed = MergedLinear(linears, transpose_weight=True).to(dtype)
    packed.pack_for_onednn()
    for rows in (1, 7, 33):
        hidden = torch.randn(rows, 48, generator=generator).to(dtype)
        assert torch.equal(packed(hidden), plain(hidden))
        assert [part.shape[-1] for part in packed.split(packed(hidden))] == [40, 24]


def test_packing_refuses_a_float32_weight():
    from joule.model.layers import MergedLinear

    projection = MergedLinear([torch.nn.Linear(8, 4)], transpose_weight=True)
    with pytest.raises(ValueError, match="16-bit CPU weight"):
        projection.pack_for_onednn()


def test_the_residual_switch_reads_zero_one_or_unset(monkeypatch):
    from joule.model.layers import RESIDUAL_IN_GEMM_ENV, residual_in_gemm

    monkeypatch.delenv(RESIDUAL_IN_GEMM_ENV, raising=False)
    assert residual_in_gemm() is False
    monkeypatch.setenv(RESIDUAL_IN_GEMM_ENV, "1")
    assert residual_in_gemm() is True
    monkeypatch.setenv(RESIDUAL_IN_GEMM_ENV, "yes")
    with pytest.raises(ValueError, match=RESIDUAL_IN_GEMM_ENV):
        residual_in_gemm()


@pytest.mark.parametrize("on", [False, True])
def test_cpu_projections_leave_the_residual_to_the_norm(monkeypatch, on):
    """The switch serves CUDA steps only: a CPU projection keeps the exact two-step sum whatever it says."""
    from joule.model.layers import MergedLinear

    monkeypatch.setenv("JOULE_RESIDUAL_IN_GEMM", "1" if on else "0")
    linear = torch.nn.Linear(16, 8, bias=False)
    projection = MergedLinear([linear], transpose_weight=False)
    hidden, residual = torch.randn(4, 16), torch.randn(4, 8)
    output, left = projection.project_onto(hidden, residual)
    assert left is residual and torch.equal(output, linear(hidden))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 7, 300])
def test_cuda_projection_adds_the_residual_in_its_gemm(monkeypatch, rows):
    from joule.model.layers import MergedLinear

    monkeypatch.setenv("JOULE_RESIDUAL_IN_GEMM", "1")
    linear = torch.nn.Linear(256, 128, bias=False).to("cuda", torch.bfloat16)
    projection = MergedLinear([linear], transpose_weight=False)
    hidden = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(rows, 128, device="cuda", dtype=torch.bfloat16)
    output, left = projection.project_onto(hidden, residual)
    assert (left is None) == (rows > 1)  # one row: the Triton GEMV, the residual left to the next norm
    projected = hidden.float() @ linear.weight.float().T
    expected = projected if left is residual else residual.float() + projected
    torch.testing.assert_close(output.float(), expected, rtol=2e-2, atol=5e-2)
