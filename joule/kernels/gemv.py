"""Batch-1 linear layers (``x @ W.T``, one input row) as a bandwidth-bound Triton GEMV.

Why: a batch-1 decode step reads every weight once and does almost no arithmetic,
so its time is the weight bytes over the memory bandwidth. cuBLAS runs a one-row
``F.linear`` at ~75-80 % of the copy bandwidth on an H100 (profile in
docs/benchmarks.md); a plain row-blocked GEMV streams the weight with enough
programs in flight to keep every SM's loads busy.

How: each program owns ``BLOCK_N`` output features and walks the whole input
dimension in ``BLOCK_K`` tiles, accumulating ``w * x`` in float32 and reducing
once at the end. ``gemv_config`` sizes the blocks so that there are several
programs per SM even for the narrow (2048-feature) projections. The reference is
``torch.nn.functional.linear``.

Around the GEMV, a batch-1 step would launch an RMSNorm before it and a SiLU-and-mul after the gate/up
projection; both fuse in (``norm_weight``, ``gated``), and under programmatic dependent launch the first
weight tiles load while the previous kernel finishes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from joule.kernels.common import (
    cdiv,
    gemv_l2_prefetch_lines,
    next_power_of_2,
    pdl_launch,
    prefetch_l2,
    processor_count,
    wait_for_previous_grid,
)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    prefetch_tiles: int = 2  # weight tiles loaded before waiting for the previous kernel (0 or a power of two)


@triton.jit
def _input_tile(x_ptr, residual_ptr, norm_weight_ptr, columns, mask, inverse_rms,
                NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """One tile of the GEMV's input in float32; with NORM, RMSNorm's output rounded as rms_norm rounds it."""
    x = tl.load(x_ptr + columns, mask=mask, other=0.0)
    if NORM:
        element = x_ptr.dtype.element_ty
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(residual_ptr + columns, mask=mask, other=0.0).to(tl.float32)).to(element)
        normed = (x.to(tl.float32) * inverse_rms).to(element)
        weight = tl.load(norm_weight_ptr + columns, mask=mask, other=0.0).to(tl.float32)
        x = (normed.to(tl.float32) * weight).to(element)
    return x.to(tl.float32)


@triton.jit
def _row_inverse_rms(x_ptr, residual_ptr, residual_out_ptr, eps, K: tl.constexpr, K_PAD: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    """RMSNorm's ``1 / rms`` of the input row (``x + residual``, rounded, with HAS_RESIDUAL; program 0 stores
    that sum as the new residual). Every program computes it: the row is small and L2-resident."""
    full = tl.arange(0, K_PAD)
    hidden = tl.load(x_ptr + full, mask=full < K, other=0.0)
    if HAS_RESIDUAL:
        hidden = (hidden.to(tl.float32)
                  + tl.load(residual_ptr + full, mask=full < K, other=0.0).to(tl.float32)).to(hidden.dtype)
        if tl.program_id(0) == 0:
            tl.store(residual_out_ptr + full, hidden, mask=full < K)
    hidden_float = hidden.to(tl.float32)
    return tl.rsqrt(tl.sum(hidden_float * hidden_float, 0) / K + eps)


@triton.jit
def _weight_tile(weight_ptr, row_offsets, row_mask, columns, K: tl.constexpr):
    return tl.load(weight_ptr + row_offsets[:, None] + columns[None, :],
                   mask=row_mask[:, None] & (columns < K)[None, :], other=0.0)


@triton.jit
def _row_sets_gemv(
    x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, eps, weight_ptr, first_offsets, second_offsets,
    row_mask, K: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH_TILES: tl.constexpr, USE_PDL: tl.constexpr,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, K_PAD: tl.constexpr, SECOND: tl.constexpr,
    L2_LINES: tl.constexpr = 0,
):
    """Dot products of the (normed) input row with one or two sets of weight rows (by row offsets), float32.

    The first PREFETCH_TILES weight tiles load before waiting for the previous kernel (under PDL they stream in
    while it finishes): no kernel of a step writes weights. One or two are added in the loop's order; more (a
    power of two, ``JOULE_GEMV_HEAD_COLUMNS``) load as one wide head tile whose row sums are added at the end.
    With L2_LINES (a power of two >= the 128-byte lines of a row), the rest of the program's rows are asked
    of L2 before the wait too (no registers held).
    """
    columns = tl.arange(0, BLOCK_K)
    WIDE: tl.constexpr = PREFETCH_TILES > 2
    if WIDE:
        head_columns = tl.arange(0, PREFETCH_TILES * BLOCK_K)
        first_head = _weight_tile(weight_ptr, first_offsets, row_mask, head_columns, K)
        if SECOND:
            second_head = _weight_tile(weight_ptr, second_offsets, row_mask, head_columns, K)
    if PREFETCH_TILES >= 1 and not WIDE:
        first_tile = _weight_tile(weight_ptr, first_offsets, row_mask, columns, K)
        if SECOND:
            second_tile = _weight_tile(weight_ptr, second_offsets, row_mask, columns, K)
    if PREFETCH_TILES == 2:
        first_next = _weight_tile(weight_ptr, first_offsets, row_mask, BLOCK_K + columns, K)
        if SECOND:
            second_next = _weight_tile(weight_ptr, second_offsets, row_mask, BLOCK_K + columns, K)
    if L2_LINES > 0:
        line_columns = tl.arange(0, L2_LINES) * (1024 // weight_ptr.dtype.element_ty.primitive_bitwidth)
        line_mask = row_mask[:, None] & (line_columns < K)[None, :]
        prefetch_l2(weight_ptr + first_offsets[:, None] + line_columns[None, :], line_mask)
        if SECOND:
            prefetch_l2(weight_ptr + second_offsets[:, None] + line_columns[None, :], line_mask)
    wait_for_previous_grid(USE_PDL)

    inverse_rms = 0.0
    if NORM:
        inverse_rms = _row_inverse_rms(x_ptr, residual_ptr, residual_out_ptr, eps, K, K_PAD, HAS_RESIDUAL)
    first_sum = tl.zeros((first_offsets.shape[0], BLOCK_K), dtype=tl.float32)
    second_sum = tl.zeros((first_offsets.shape[0], BLOCK_K), dtype=tl.float32)
    if PREFETCH_TILES >= 1 and not WIDE:
        x = _input_tile(x_ptr, residual_ptr, norm_weight_ptr, columns, columns < K, inverse_rms, NORM, HAS_RESIDUAL)
        first_sum += first_tile.to(tl.float32) * x[None, :]
        if SECOND:
            second_sum += second_tile.to(tl.float32) * x[None, :]
    if PREFETCH_TILES == 2:
        x = _input_tile(x_ptr, residual_ptr, norm_weight_ptr, BLOCK_K + columns, BLOCK_K + columns < K,
                        inverse_rms, NORM, HAS_RESIDUAL)
        first_sum += first_next.to(tl.float32) * x[None, :]
        if SECOND:
            second_sum += second_next.to(tl.float32) * x[None, :]
    for start in range(PREFETCH_TILES * BLOCK_K, K, BLOCK_K):
        tile_columns = start + columns
        x = _input_tile(x_ptr, residual_ptr, norm_weight_ptr, tile_columns, tile_columns < K, inverse_rms,
                        NORM, HAS_RESIDUAL)
        first_sum += _weight_tile(weight_ptr, first_offsets, row_mask, tile_columns, K).to(tl.float32) * x[None, :]
        if SECOND:
            second_sum += (_weight_tile(weight_ptr, second_offsets, row_mask, tile_columns, K).to(tl.float32)
                           * x[None, :])
    first_result = tl.sum(first_sum, axis=1)
    second_result = tl.sum(second_sum, axis=1)
    if WIDE:
        head_x = _input_tile(x_ptr, residual_ptr, norm_weight_ptr, head_columns, head_columns < K, inverse_rms,
                             NORM, HAS_RESIDUAL)
        first_result += tl.sum(first_head.to(tl.float32) * head_x[None, :], axis=1)
        if SECOND:
            second_result += tl.sum(second_head.to(tl.float32) * head_x[None, :], axis=1)
    return first_result, second_result


@triton.jit
def _gemv_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr, N, stride_weight,
    residual_ptr, norm_weight_ptr, residual_out_ptr, eps,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH_TILES: tl.constexpr, USE_PDL: tl.constexpr,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, K_PAD: tl.constexpr, GATED: tl.constexpr,
    L2_LINES: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    # GATED: the up half's rows lie N below the gate's
    result, up = _row_sets_gemv(
        x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, eps, weight_ptr,
        rows.to(tl.int64) * stride_weight, (rows + N).to(tl.int64) * stride_weight, row_mask,
        K, BLOCK_K, PREFETCH_TILES, USE_PDL, NORM, HAS_RESIDUAL, K_PAD, GATED, L2_LINES)
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if GATED:  # silu(gate) * up from the rounded projections, as silu_and_mul computes it
        if HAS_BIAS:
            up += tl.load(bias_ptr + N + rows, mask=row_mask, other=0.0).to(tl.float32)
        gate = result.to(out_ptr.dtype.element_ty).to(tl.float32)
        up = up.to(out_ptr.dtype.element_ty).to(tl.float32)
        result = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + rows, result.to(out_ptr.dtype.element_ty), mask=row_mask)


WIDE_WEIGHT_ELEMENTS = 24 << 20
# 16-bit weight bytes one program of a narrow projection reads: down 2048x8192 ran 8.6 us as 1-row programs
# (16 KB) against 12.0 us as 2-row ones (gemv_sweep.py narrow, H200); qkv (4 rows x 2048) and o (2 rows) fit.
MAX_PROGRAM_BYTES = 16 << 10


def gemv_config(out_features: int, in_features: int, num_sms: int = 132, gated: bool = False) -> GemvConfig:
    """Blocks for one ``[out, in]`` weight: >= 8 programs per SM where the layer is wide enough.

    Measured where they run, in a 16-layer chain of batch-1 GEMVs under PDL (benchmarks/gpu/layer_chain_sweep.py,
    H100, 2026-12-06 (i)): o 2048x2048 as 1-row programs, 1.3 us a layer ahead of 2-row ones (the old rule of >= 4
    programs per SM); the gated gate/up 16384x2048 as 4-row blocks (2 gate + 2 up rows) of 512 columns, 1.8 us a
    layer ahead of 8 x 256. Batch 1 went 955 -> 997 tok/s with both (bs1_ab.py, two rounds). Other weights of 24M+
    elements (lm_head 128256x2048) keep 8 x 256, best in gemv_sweep.py on the H200 (121.8 us against cuBLAS's 127.5).
    """
    if out_features * in_features >= WIDE_WEIGHT_ELEMENTS:
        if gated:
            return GemvConfig(block_n=4, block_k=min(512, next_power_of_2(in_features)), num_warps=4,
                              num_stages=1, prefetch_tiles=2)
        return GemvConfig(block_n=8, block_k=min(256, next_power_of_2(in_features)), num_warps=4,
                          num_stages=1, prefetch_tiles=2)
    block_k = min(512, next_power_of_2(in_features))
    block_n = 32
    while block_n > 1 and (cdiv(out_features, block_n) < 8 * num_sms
                           or block_n * in_features * 2 > MAX_PROGRAM_BYTES):
        block_n //= 2
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=3, prefetch_tiles=2)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``F.linear(x, weight, bias)`` for one row ``x`` ``[1, K]`` and a row-major ``weight`` ``[N, K]``.

    Fusions that save a decode step a launch each: ``norm_weight`` applies RMSNorm to the input first (to
    ``x + residual`` with ``residual``, returning that sum as well: ``(output, new_residual)``, like
    ``rms_norm``); ``gated`` treats the weight as gate rows over up rows and returns ``silu(gate) * up``
    ``[1, N / 2]``, like ``silu_and_mul``. Rounding follows those kernels step by step.
    """
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv: x must be one contiguous row [1, K], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight must be [N, {x.shape[1]}] with contiguous rows, got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    check_norm_inputs("gemv", x, norm_weight, residual)
    if gated and out_features % 2:
        raise ValueError(f"gemv: gated needs an even number of weight rows (gate over up), got {out_features}")
    if config is None:
        config = gemv_config(out_features, in_features, processor_count(x.device), gated)
    prefetch_tiles = head_tiles(config.prefetch_tiles, config.block_k, in_features, config.block_n)
    outputs = out_features // 2 if gated else out_features
    block_n = max(1, config.block_n // 2) if gated else config.block_n  # the same bytes per program
    use_pdl = pdl_launch(x.device)
    output = torch.empty((1, outputs), dtype=x.dtype, device=x.device)
    residual_output = torch.empty_like(x) if residual is not None else None
    _gemv_kernel[(cdiv(outputs, block_n),)](
        x, weight, bias if bias is not None else weight, output, outputs, weight.stride(0),
        residual if residual is not None else x, norm_weight if norm_weight is not None else x,
        residual_output if residual_output is not None else x, eps,
        K=in_features, HAS_BIAS=bias is not None, BLOCK_N=block_n, BLOCK_K=config.block_k,
        PREFETCH_TILES=prefetch_tiles, USE_PDL=use_pdl, NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None, K_PAD=next_power_of_2(in_features), GATED=gated,
        L2_LINES=gemv_l2_prefetch_lines(use_pdl, in_features, weight.element_size()),
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=use_pdl,
    )
    return output if residual_output is None else (output, residual_output)


def head_tiles(requested: int, block_k: int, in_features: int, rows: int) -> int:
    """Weight tiles a GEMV program of ``rows`` weight rows loads before its PDL wait: ``requested`` (0 or a power
    of two), or as many as ``JOULE_GEMV_HEAD_COLUMNS`` columns where that is set (benchmarks compare; 0 turns the
    head off) and the program's rows hold at most MAX_PROGRAM_BYTES, never more than the padded row holds.

    Why: the wait lasts until the previous kernel's last program ends (~2-4 us of a batch-1 layer's hops), and
    only what a resident program loaded before it overlaps that time. Narrow projections (q/k/v, o, down: one
    wave of programs of <= 16 KB) can hold their whole slice; the gated gate/up's 32 KB programs cannot without
    losing residency (ptxas, sm_90: 64 registers a thread with two tiles, 168 with the whole row).
    """
    padded = next_power_of_2(in_features)
    override = os.environ.get("JOULE_GEMV_HEAD_COLUMNS", "")
    if override and rows * padded * 2 <= MAX_PROGRAM_BYTES:
        columns = int(override)
        requested = 0 if columns <= 0 else max(1, next_power_of_2(columns) // block_k)
    if requested < 0 or requested & (requested - 1):
        raise ValueError(f"gemv: prefetch_tiles must be 0 or a power of two, got {requested}")
    return min(requested, max(1, padded // block_k))


def check_norm_inputs(caller: str, x: torch.Tensor, norm_weight: torch.Tensor | None,
                      residual: torch.Tensor | None) -> None:
    """A fused RMSNorm prologue needs a norm weight of the row's size and dtype; a residual needs the norm."""
    if residual is not None and (norm_weight is None or residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError(f"{caller}: residual {tuple(residual.shape)} needs norm_weight and the input row's shape "
                         f"{tuple(x.shape)}")
    if norm_weight is not None and (norm_weight.shape != (x.shape[1],) or norm_weight.dtype != x.dtype):
        raise ValueError(f"{caller}: norm_weight must be [{x.shape[1]}] in {x.dtype}, got "
                         f"{tuple(norm_weight.shape)} {norm_weight.dtype}")


