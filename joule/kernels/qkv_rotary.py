"""Batch-1 attention input in one launch: RMSNorm, the q/k/v GEMV, rotary embedding and the KV-cache write.

Why: in a batch-1 decode step each kernel between the layer's input and its attention is a hop on the
critical path (wait for the previous grid, a DRAM round trip, store). Unfused this is norm -> GEMV ->
rotary (+ cache write) -> attention; here the rotary and the cache write ride in the GEMV's epilogue.

How: rotary pairs element ``i`` of a head with element ``i + head_dim / 2``, so each program computes
``PAIRS`` such pairs of one head (two row sets of the merged weight, two accumulators) and can rotate
them in registers. Query heads go to the query output; key heads, rotated, and value heads go straight
to the token's cache slot (a negative slot, a padding row, writes nothing). The input norm is the GEMV's
prologue (``gemv``'s ``_input_tile``). Rounding follows the unfused kernels step by step: projections
rounded to the activation dtype, rotation in float32 rounded back, then cast (saturating for fp8) to the
cache dtype, so the result is the same as ``gemv`` followed by ``rotary_embedding_(cache=...)``.
Models with per-head q/k norms (Qwen3) need the whole head first and keep the unfused path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import gemv_l2_prefetch_lines, next_power_of_2, pdl_launch
from joule.kernels.gemv import _row_sets_gemv, check_norm_inputs, head_tiles
from joule.kernels.kv_write import check_cache_pair, saturate_for_cache


@triton.jit
def _qkv_rotary_kernel(
    x_ptr, weight_ptr, bias_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, eps,
    cos_ptr, sin_ptr, query_out_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    stride_weight, stride_cache_block, stride_cache_offset, stride_cache_head,
    K: tl.constexpr, NUM_QUERY_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    PAIRS: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH_TILES: tl.constexpr, USE_PDL: tl.constexpr,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SATURATE: tl.constexpr, L2_LINES: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_DIM // 2
    program = tl.program_id(0)
    head = program // (HALF // PAIRS)
    pairs = (program % (HALF // PAIRS)) * PAIRS + tl.arange(0, PAIRS)
    first_rows = head * HEAD_DIM + pairs
    first, second = _row_sets_gemv(
        x_ptr, residual_ptr, norm_weight_ptr, residual_out_ptr, eps, weight_ptr,
        first_rows.to(tl.int64) * stride_weight, (first_rows + HALF).to(tl.int64) * stride_weight,
        pairs < HALF,  # every row exists: the grid covers whole heads
        K, BLOCK_K, PREFETCH_TILES, USE_PDL, NORM, HAS_RESIDUAL, K_PAD, True, L2_LINES)
    if HAS_BIAS:
        first += tl.load(bias_ptr + first_rows).to(tl.float32)
        second += tl.load(bias_ptr + first_rows + HALF).to(tl.float32)
    element = x_ptr.dtype.element_ty
    first = first.to(element).to(tl.float32)  # the merged projection's output, as the unfused path stores it
    second = second.to(element).to(tl.float32)

    if head < NUM_QUERY_HEADS + NUM_KV_HEADS:  # queries and keys rotate; values do not
        cos = tl.load(cos_ptr + pairs)
        sin = tl.load(sin_ptr + pairs)
        rotated_first = (first * cos - second * sin).to(element)
        rotated_second = (second * cos + first * sin).to(element)
        first = rotated_first.to(tl.float32)
        second = rotated_second.to(tl.float32)
    if head < NUM_QUERY_HEADS:
        tl.store(query_out_ptr + first_rows, first.to(query_out_ptr.dtype.element_ty))
        tl.store(query_out_ptr + first_rows + HALF, second.to(query_out_ptr.dtype.element_ty))
    else:
        slot = tl.load(slot_mapping_ptr).to(tl.int64)
        if slot >= 0:
            in_cache = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_offset + pairs
            first = saturate_for_cache(first, SATURATE)  # as write_kv_cache does
            second = saturate_for_cache(second, SATURATE)
            if head < NUM_QUERY_HEADS + NUM_KV_HEADS:
                target = key_cache_ptr + in_cache + (head - NUM_QUERY_HEADS) * stride_cache_head
            else:
                target = value_cache_ptr + in_cache + (head - NUM_QUERY_HEADS - NUM_KV_HEADS) * stride_cache_head
            tl.store(target, first.to(key_cache_ptr.dtype.element_ty))
            tl.store(target + HALF, second.to(key_cache_ptr.dtype.element_ty))


def qkv_rotary_gemv(
    hidden: torch.Tensor,  # [1, hidden_size]
    weight: torch.Tensor,  # [(Hq + 2 Hkv) * D, hidden_size]: q rows, then k, then v
    bias: torch.Tensor | None,
    cos: torch.Tensor,  # [1, D / 2] float32
    sin: torch.Tensor,
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [1]
    num_query_heads: int,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    pairs: int = 2,
    block_k: int = 512,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotated queries ``[1, Hq * D]`` (keys and values go to the cache) and, with ``residual``, the new
    residual ``hidden + residual`` (else None); ``norm_weight`` applies RMSNorm to the input first."""
    if hidden.dim() != 2 or hidden.shape[0] != 1 or hidden.stride(1) != 1:
        raise ValueError(f"qkv_rotary_gemv: hidden must be one contiguous row [1, K], got {tuple(hidden.shape)}")
    num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
    in_features = hidden.shape[1]
    rows = (num_query_heads + 2 * num_kv_heads) * head_dim
    if weight.shape != (rows, in_features) or weight.stride(1) != 1:
        raise ValueError(f"qkv_rotary_gemv: weight must be [{rows}, {in_features}] (q, k, v rows) with contiguous "
                         f"rows, got {tuple(weight.shape)}")
    half = head_dim // 2
    if head_dim % 2 or half % pairs or pairs & (pairs - 1):
        raise ValueError(f"qkv_rotary_gemv: pairs ({pairs}) must be a power of two dividing head_dim / 2 ({half})")
    if cos.shape != (1, half) or sin.shape != (1, half) or cos.stride(1) != 1 or sin.stride(1) != 1:
        raise ValueError(f"qkv_rotary_gemv: cos/sin must be contiguous [1, {half}], got {tuple(cos.shape)}")
    check_cache_pair("qkv_rotary_gemv", key_cache, value_cache)
    check_norm_inputs("qkv_rotary_gemv", hidden, norm_weight, residual)
    query = torch.empty((1, num_query_heads * head_dim), dtype=hidden.dtype, device=hidden.device)
    residual_output = torch.empty_like(hidden) if residual is not None else None
    block_k = min(block_k, next_power_of_2(in_features))
    use_pdl = pdl_launch(hidden.device)
    grid = ((num_query_heads + 2 * num_kv_heads) * (half // pairs),)
    _qkv_rotary_kernel[grid](
        hidden, weight, bias if bias is not None else weight, residual if residual is not None else hidden,
        norm_weight if norm_weight is not None else hidden,
        residual_output if residual_output is not None else hidden, eps,
        cos, sin, query, key_cache, value_cache, slot_mapping,
        weight.stride(0), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        K=in_features, NUM_QUERY_HEADS=num_query_heads, NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        PAIRS=pairs, BLOCK_K=block_k, PREFETCH_TILES=head_tiles(1, block_k, in_features, 2 * pairs), USE_PDL=use_pdl,
        NORM=norm_weight is not None, HAS_RESIDUAL=residual is not None, K_PAD=next_power_of_2(in_features),
        HAS_BIAS=bias is not None,
        BLOCK_SIZE=key_cache.shape[1], SATURATE=key_cache.dtype == torch.float8_e4m3fn,
        L2_LINES=gemv_l2_prefetch_lines(use_pdl, in_features, weight.element_size()),
        num_warps=4, num_stages=3, launch_pdl=use_pdl,
    )
    return query, residual_output
