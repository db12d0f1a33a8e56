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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from joule.kernels.common import pdl_launch, wait_for_previous_grid


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    prefetch_tiles: int = 1  # weight tiles loaded before waiting for the previous kernel (0-2)


@triton.jit
def _gemv_kernel(
    x_ptr, weight_ptr, bias_ptr, out_ptr, N, stride_weight,
    K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PREFETCH_TILES: tl.constexpr, USE_PDL: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    row_offsets = rows.to(tl.int64) * stride_weight
    # The first PREFETCH_TILES (0-2) weight tiles load before waiting for the previous kernel (under PDL they
    # stream in while it finishes): no kernel of a step writes weights. They are added in the loop's order.
    columns = tl.arange(0, BLOCK_K)
    if PREFETCH_TILES >= 1:
        first_weight = tl.load(weight_ptr + row_offsets[:, None] + columns[None, :],
                               mask=row_mask[:, None] & (columns < K)[None, :], other=0.0)
    if PREFETCH_TILES >= 2:
        second_weight = tl.load(weight_ptr + row_offsets[:, None] + BLOCK_K + columns[None, :],
                                mask=row_mask[:, None] & (BLOCK_K + columns < K)[None, :], other=0.0)
    wait_for_previous_grid(USE_PDL)
    accumulator = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH_TILES >= 1:
        x = tl.load(x_ptr + columns, mask=columns < K, other=0.0).to(tl.float32)
        accumulator += first_weight.to(tl.float32) * x[None, :]
    if PREFETCH_TILES >= 2:
        x = tl.load(x_ptr + BLOCK_K + columns, mask=BLOCK_K + columns < K, other=0.0).to(tl.float32)
        accumulator += second_weight.to(tl.float32) * x[None, :]
    for start in range(PREFETCH_TILES * BLOCK_K, K, BLOCK_K):
        tile_columns = start + columns
        column_mask = tile_columns < K
        x = tl.load(x_ptr + tile_columns, mask=column_mask, other=0.0).to(tl.float32)
        weight = tl.load(weight_ptr + row_offsets[:, None] + tile_columns[None, :],
                         mask=row_mask[:, None] & column_mask[None, :], other=0.0)
        accumulator += weight.to(tl.float32) * x[None, :]
    result = tl.sum(accumulator, axis=1)
    if HAS_BIAS:
        result += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows, result.to(out_ptr.dtype.element_ty), mask=row_mask)


def gemv_config(out_features: int, in_features: int, num_sms: int = 132) -> GemvConfig:
    """Blocks for one ``[out, in]`` weight: >= 4 programs per SM where the layer is wide enough."""
    block_k = min(512, triton.next_power_of_2(in_features))
    block_n = 32
    while block_n > 2 and triton.cdiv(out_features, block_n) < 4 * num_sms:
        block_n //= 2
    return GemvConfig(block_n=block_n, block_k=block_k, num_warps=4, num_stages=3)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for one row ``x`` ``[1, K]`` and a row-major ``weight`` ``[N, K]``."""
    if x.dim() != 2 or x.shape[0] != 1 or x.stride(1) != 1:
        raise ValueError(f"gemv: x must be one contiguous row [1, K], got shape {tuple(x.shape)}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[1] or weight.stride(1) != 1:
        raise ValueError(f"gemv: weight must be [N, {x.shape[1]}] with contiguous rows, got {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    if config is None:
        config = gemv_config(out_features, in_features, _num_sms(x.device))
    if config.prefetch_tiles not in (0, 1, 2):
        raise ValueError(f"gemv: prefetch_tiles must be 0, 1 or 2, got {config.prefetch_tiles}")
    use_pdl = pdl_launch(x.device)
    output = torch.empty((1, out_features), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(out_features, config.block_n),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, output, out_features, weight.stride(0),
        K=in_features, HAS_BIAS=bias is not None, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        PREFETCH_TILES=config.prefetch_tiles, USE_PDL=use_pdl,
        num_warps=config.num_warps, num_stages=config.num_stages, launch_pdl=use_pdl,
    )
    return output


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count
