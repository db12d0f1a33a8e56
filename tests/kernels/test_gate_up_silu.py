"""The fused gate/up + SiLU GEMM against the merged projection followed by SwiGLU, and the MLP's switch to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.gate_up_silu import fused_gate_up_enabled, gate_up_silu  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The unfused path's rounding: the projection rounded to the activation dtype, then SiLU-and-mul in float32."""
    gate, up = F.linear(hidden.float(), weight.float()).to(hidden.dtype).float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(hidden.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,intermediate,hidden_size,tile", [
    (40, 48, 64, (16, 16, 16, 4, 1, 2)),   # 3 row blocks in groups of 2: the last group is short
    (16, 40, 72, (16, 32, 32, 4, 1, 8)),   # neither the columns nor the inner size a multiple of the tile
    (3, 24, 32, None),                     # the wrapper's own tile for a few rows
])
def test_fused_gemm_matches_projection_then_swiglu(dtype, rows, intermediate, hidden_size, tile):
    generator = torch.Generator().manual_seed(rows * intermediate)
    hidden = torch.randn(rows, hidden_size, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(2 * intermediate, hidden_size, generator=generator) / hidden_size ** 0.5).to(DEVICE, dtype)
    fused = gate_up_silu(hidden, weight, tile)
    assert fused.shape == (rows, intermediate) and fused.dtype == dtype and fused.abs().sum() > 0
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused.float(), reference(hidden, weight).float(), atol=tolerance, rtol=tolerance)


def test_rejects_a_weight_that_is_not_gate_over_up_rows():
    with pytest.raises(ValueError, match="weight"):
        gate_up_silu(torch.ones(2, 8, device=DEVICE), torch.ones(5, 8, device=DEVICE))
    with pytest.raises(ValueError, match="hidden"):
        gate_up_silu(torch.ones(8, device=DEVICE), torch.ones(4, 8, device=DEVICE))
    assert gate_up_silu(torch.ones(0, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE)).shape == (0, 2)


def test_the_switch_is_off_unless_asked(monkeypatch):
    monkeypatch.delenv("JOULE_FUSED_GATE_UP", raising=False)
    assert not fused_gate_up_enabled()
    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "1")
    assert fused_gate_up_enabled()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the MLP takes the fused GEMM on CUDA only")
@torch.inference_mode()
def test_the_mlp_gives_the_same_output_with_the_fused_gemm(monkeypatch):
    from joule.model.layers import GatedMLP, RMSNorm, norm_then_project

    torch.manual_seed(0)
    mlp = GatedMLP(256, 512).to("cuda", torch.bfloat16)
    mlp.merge_projections(transpose_weight=False)
    norm = RMSNorm(256, 1e-6).to("cuda", torch.bfloat16)
    hidden, residual = (torch.randn(300, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "0")
    expected, expected_residual = norm_then_project(mlp.gate_up_proj, norm, hidden, residual, gated=True)
    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "1")
    fused, fused_residual = norm_then_project(mlp.gate_up_proj, norm, hidden, residual, gated=True)
    assert torch.equal(fused_residual, expected_residual)
    torch.testing.assert_close(fused.float(), expected.float(), atol=2e-2, rtol=2e-2)
