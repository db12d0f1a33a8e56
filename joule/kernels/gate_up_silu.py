"""The MLP's gate/up projection with SiLU-and-mul in its epilogue: one GEMM writing ``silu(x W_g^T) * (x W_u^T)``.

Why: a ~8k-token prompt step's layer on the H100 spends ~137 us in SiLU-and-mul after cuBLAS's gate/up GEMM
(~790 us), reading the GEMM's [T, 2I] output back and writing [T, I] (docs/benchmarks.md, 2026-12-05 (f)). Keeping
both halves' accumulators in one program and writing only the product saves that pass and half the GEMM's stores,
if the GEMM runs near cuBLAS's speed: off until measured (``JOULE_FUSED_GATE_UP=1``; ``fused_gate_up_enabled``),
timed against cuBLAS + ``silu_and_mul`` by ``benchmarks/gpu/gate_up_silu_sweep.py``.
How: each program computes one [BLOCK_M, BLOCK_N] tile of the output from the gate rows ``n`` and the up rows
``I + n`` of the merged [2I, K] weight (the engine's layout), two float32 accumulators; the projections are rounded
to the activation dtype before the SiLU, as the unfused path rounds them; programs walk GROUP_M row blocks per
column block so neighbours share weight tiles in L2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from joule.kernels.common import cdiv, dot_precision, interpreting

# (block_m, block_n, block_k, num_warps, num_stages, group_m); compiled for sm_90 without register spills (ptxas).
PROMPT_TILE = (128, 128, 64, 8, 3, 8)
SMALL_TILE = (64, 64, 64, 4, 4, 8)


@triton.jit
def _gate_up_silu_kernel(x_ptr, weight_ptr, out_ptr, rows, intermediate, hidden, stride_x, stride_weight,
                         stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    program = tl.program_id(0)
    row_blocks = tl.cdiv(rows, BLOCK_M)
    column_blocks = tl.cdiv(intermediate, BLOCK_N)
    per_group = GROUP_M * column_blocks
    first_row_block = (program // per_group) * GROUP_M
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (program % per_group) % group_rows
    column_block = (program % per_group) // group_rows
    row_offsets = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    column_offsets = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, column_mask = row_offsets < rows, column_offsets < intermediate
    inner = tl.arange(0, BLOCK_K)
    # 32-bit offsets (the wrapper checks every operand is under 2**31 elements), advanced in place: 64-bit
    # pointer tiles rebuilt each step spilled registers at every tile (ptxas, sm_90).
    x_pointers = x_ptr + row_offsets[:, None] * stride_x + inner[None, :]
    gate_pointers = weight_ptr + column_offsets[None, :] * stride_weight + inner[:, None]
    up_pointers = gate_pointers + intermediate * stride_weight
    gate_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, hidden, BLOCK_K):
        inner_mask = start + inner < hidden
        x = tl.load(x_pointers, mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        weight_mask = inner_mask[:, None] & column_mask[None, :]
        gate = tl.load(gate_pointers, mask=weight_mask, other=0.0)
        up = tl.load(up_pointers, mask=weight_mask, other=0.0)
        if UPCAST:  # the interpreter's tl.dot mishandles 16-bit operands
            gate_sum += tl.dot(x.to(tl.float32), gate.to(tl.float32), input_precision="ieee")
            up_sum += tl.dot(x.to(tl.float32), up.to(tl.float32), input_precision="ieee")
        else:
            gate_sum = tl.dot(x, gate, gate_sum, input_precision=PRECISION)
            up_sum = tl.dot(x, up, up_sum, input_precision=PRECISION)
        x_pointers += BLOCK_K
        gate_pointers += BLOCK_K
        up_pointers += BLOCK_K
    element = out_ptr.dtype.element_ty
    gate_value = gate_sum.to(element).to(tl.float32)
    up_value = up_sum.to(element).to(tl.float32)
    activated = gate_value / (1.0 + tl.exp(-gate_value)) * up_value
    tl.store(out_ptr + row_offsets[:, None] * stride_out + column_offsets[None, :], activated.to(element),
             mask=row_mask[:, None] & column_mask[None, :])


def gate_up_silu(hidden: torch.Tensor, weight: torch.Tensor,
                 tile: tuple[int, int, int, int, int, int] | None = None) -> torch.Tensor:
    """``silu(hidden @ weight[:I].T) * (hidden @ weight[I:].T)`` for a merged ``[2I, K]`` weight, ``[T, I]``."""
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(f"gate_up_silu: hidden must be [T, K] with contiguous rows, got {tuple(hidden.shape)}")
    rows, hidden_size = hidden.shape
    if weight.dim() != 2 or weight.shape[1] != hidden_size or weight.shape[0] % 2 or weight.stride(1) != 1:
        raise ValueError(f"gate_up_silu: weight {tuple(weight.shape)} must be [2I, {hidden_size}] (gate rows over up "
                         "rows) with contiguous rows")
    if hidden.numel() >= 2**31 or weight.numel() >= 2**31:
        raise ValueError("gate_up_silu: operands of 2**31 elements or more need 64-bit offsets")
    intermediate = weight.shape[0] // 2
    output = torch.empty((rows, intermediate), dtype=hidden.dtype, device=hidden.device)
    if rows == 0:
        return output
    block_m, block_n, block_k, num_warps, num_stages, group_m = tile or (PROMPT_TILE if rows >= 1024 else SMALL_TILE)
    grid = (cdiv(rows, block_m) * cdiv(intermediate, block_n),)
    _gate_up_silu_kernel[grid](
        hidden, weight, output, rows, intermediate, hidden_size, hidden.stride(0), weight.stride(0), output.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m, PRECISION=dot_precision(hidden.dtype),
        UPCAST=interpreting(), num_warps=num_warps, num_stages=num_stages,
    )
    return output


def fused_gate_up_enabled() -> bool:
    """``JOULE_FUSED_GATE_UP=1``: multi-row gate/up projections on CUDA run ``gate_up_silu`` (off until measured)."""
    return os.environ.get("JOULE_FUSED_GATE_UP", "0") in ("1", "true", "on")
