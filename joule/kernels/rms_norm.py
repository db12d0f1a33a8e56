"""Fused (residual add +) RMSNorm: one read and one write of the hidden states.

Matches Hugging Face's arithmetic: ``hidden + residual`` rounded to the input
dtype (that rounded sum is the new residual), statistics in float32, the
normalised row cast back to the input dtype before the weight multiply.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import next_power_of_2, pdl_launch, wait_for_previous_grid


@triton.jit
def _rms_norm_kernel(
    hidden_ptr, residual_ptr, weight_ptr, output_ptr, residual_output_ptr, eps,
    stride_hidden, stride_residual, stride_output, stride_residual_output,
    HIDDEN_SIZE: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    columns = tl.arange(0, BLOCK)
    mask = columns < HIDDEN_SIZE
    hidden = tl.load(hidden_ptr + row * stride_hidden + columns, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + columns, mask=mask, other=0.0)
        hidden = (hidden.to(tl.float32) + residual.to(tl.float32)).to(hidden_ptr.dtype.element_ty)
        tl.store(residual_output_ptr + row * stride_residual_output + columns, hidden, mask=mask)
    hidden_float = hidden.to(tl.float32)
    mean_square = tl.sum(hidden_float * hidden_float, 0) / HIDDEN_SIZE
    normed = (hidden_float * tl.rsqrt(mean_square + eps)).to(hidden_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + columns, mask=mask, other=0.0)
    output = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(output_ptr + row * stride_output + columns, output.to(output_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    hidden: torch.Tensor,  # [T, H]
    weight: torch.Tensor,  # [H]
    eps: float,
    residual: torch.Tensor | None = None,  # [T, H]
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``weight * norm(hidden [+ residual])``; with ``residual`` also returns the new residual."""
    if hidden.dim() != 2 or hidden.stride(1) != 1 or weight.shape != (hidden.shape[1],):
        raise ValueError(f"rms_norm: hidden {tuple(hidden.shape)} (last dim contiguous) and weight "
                         f"{tuple(weight.shape)} must be [T, H] and [H]")
    if residual is not None and (residual.shape != hidden.shape or residual.stride(1) != 1):
        raise ValueError(f"rms_norm: residual {tuple(residual.shape)} must match hidden {tuple(hidden.shape)}")
    num_rows, hidden_size = hidden.shape
    output = torch.empty(hidden.shape, dtype=torch.promote_types(hidden.dtype, weight.dtype), device=hidden.device)
    residual_output = torch.empty_like(hidden) if residual is not None else output
    if num_rows > 0:
        block = next_power_of_2(hidden_size)
        use_pdl = pdl_launch(hidden.device)
        _rms_norm_kernel[(num_rows,)](
            hidden, residual if residual is not None else hidden, weight, output, residual_output, eps,
            hidden.stride(0), residual.stride(0) if residual is not None else 0, output.stride(0),
            residual_output.stride(0),
            HIDDEN_SIZE=hidden_size, BLOCK=block, HAS_RESIDUAL=residual is not None, USE_PDL=use_pdl,
            num_warps=max(1, min(16, block // 256)), launch_pdl=use_pdl,
        )
    return output if residual is None else (output, residual_output)
