"""Fused (residual add +) RMSNorm kernel against the Hugging Face-style reference."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.reference import rms_norm_reference  # noqa: E402
from joule.kernels.rms_norm import rms_norm  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden_size", [64, 96, 1024])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(dtype, hidden_size, with_residual):
    generator = torch.Generator().manual_seed(hidden_size)
    hidden = (torch.randn(7, hidden_size, generator=generator) * 3).to(DEVICE, dtype)
    residual = torch.randn(7, hidden_size, generator=generator).to(DEVICE, dtype) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden_size, generator=generator)).to(DEVICE, dtype)
    actual = rms_norm(hidden, weight, 1e-5, residual)
    expected = rms_norm_reference(hidden, weight, 1e-5, residual)
    if not with_residual:
        actual, expected = (actual,), (expected,)
    # One unit in the last place: the interpreter rounds float32 -> bfloat16 differently from torch.
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1.6e-2}[dtype]
    for got, want in zip(actual, expected):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got.float(), want.float(), atol=tolerance, rtol=tolerance)


def test_rms_norm_rejects_mismatched_weight():
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.randn(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), 1e-6)
