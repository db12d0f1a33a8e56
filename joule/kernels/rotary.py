"""Rotary position embedding of queries and keys in place, one launch per layer.

Why a kernel: in eager PyTorch, rotating q and k costs a gather of cos/sin, two
casts, four multiplies, two adds and a concatenation per tensor, ~20 tiny
launches per layer that dominate small-batch decode on a GPU. Here one program
rotates every query and key head of one token, reading its float32 cos/sin row once.

Qwen3 normalises each query and key head (RMSNorm over ``head_dim``) before
rotating; ``query_norm_weight``/``key_norm_weight`` fuse that in as well.
Arithmetic: statistics and rotation in float32, rounded once to the tensor dtype
(the eager path rounds after each operation, so bf16 results differ by an ulp).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import next_power_of_2, pdl_launch, wait_for_previous_grid
from joule.kernels.kv_write import check_cache_pair, saturate_for_cache


@triton.jit
def _rotate_heads(base, stride_head, num_heads, norm_ptr, eps, cos, sin, offsets, mask_half,
                  destination, stride_destination_head, stored_heads, HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
                  HAS_NORM: tl.constexpr, SATURATE: tl.constexpr):
    """Rotate (and optionally RMS-normalise) all heads of one token: a [heads, half] tile per half.

    The first ``stored_heads`` results go to ``destination`` (the input itself, or a KV-cache slot)."""
    heads = tl.arange(0, HEADS_PAD)
    mask = (heads[:, None] < num_heads) & mask_half[None, :]
    pointers = base + heads[:, None] * stride_head + offsets[None, :]
    first = tl.load(pointers, mask=mask, other=0.0).to(tl.float32)
    second = tl.load(pointers + HALF, mask=mask, other=0.0).to(tl.float32)
    if HAS_NORM:
        mean_square = (tl.sum(first * first, 1) + tl.sum(second * second, 1)) / (2 * HALF)
        inverse = tl.rsqrt(mean_square + eps)[:, None]
        element = base.dtype.element_ty
        first_weight = tl.load(norm_ptr + offsets, mask=mask_half, other=0.0).to(tl.float32)
        second_weight = tl.load(norm_ptr + HALF + offsets, mask=mask_half, other=0.0).to(tl.float32)
        first = (first * inverse).to(element).to(tl.float32) * first_weight[None, :]
        second = (second * inverse).to(element).to(tl.float32) * second_weight[None, :]
    # Rounded to the input's dtype first (the unfused path stores it there), then cast to the destination's.
    rotated_first = (first * cos[None, :] - second * sin[None, :]).to(base.dtype.element_ty)
    rotated_second = (second * cos[None, :] + first * sin[None, :]).to(base.dtype.element_ty)
    rotated_first = saturate_for_cache(rotated_first, SATURATE)
    rotated_second = saturate_for_cache(rotated_second, SATURATE)
    targets = destination + heads[:, None] * stride_destination_head + offsets[None, :]
    element = destination.dtype.element_ty
    store_mask = (heads[:, None] < stored_heads) & mask_half[None, :]
    tl.store(targets, rotated_first.to(element), mask=store_mask)
    tl.store(targets + HALF, rotated_second.to(element), mask=store_mask)


@triton.jit
def _rotary_kernel(
    query_ptr, key_ptr, cos_ptr, sin_ptr, query_norm_ptr, key_norm_ptr, eps,
    stride_query_token, stride_query_head, stride_key_token, stride_key_head, stride_table,
    value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_offset, stride_cache_head,
    NUM_QUERY_HEADS: tl.constexpr, NUM_KEY_HEADS: tl.constexpr, QUERY_HEADS_PAD: tl.constexpr,
    KEY_HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr, HAS_NORM: tl.constexpr,
    USE_PDL: tl.constexpr, WRITE_CACHE: tl.constexpr, BLOCK_SIZE: tl.constexpr, SATURATE: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    token = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, HALF_PAD)
    mask_half = offsets < HALF
    cos = tl.load(cos_ptr + token * stride_table + offsets, mask=mask_half, other=0.0)
    sin = tl.load(sin_ptr + token * stride_table + offsets, mask=mask_half, other=0.0)
    query = query_ptr + token * stride_query_token
    _rotate_heads(query, stride_query_head, NUM_QUERY_HEADS, query_norm_ptr, eps, cos, sin, offsets, mask_half,
                  query, stride_query_head, NUM_QUERY_HEADS, HALF, QUERY_HEADS_PAD, HAS_NORM, False)
    key = key_ptr + token * stride_key_token
    if WRITE_CACHE:  # rotated keys and the values go straight to the token's cache slot (negative: padding)
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        stored_heads = tl.where(slot >= 0, NUM_KEY_HEADS, 0)
        slot = tl.maximum(slot, 0)
        cache_offset = (slot // BLOCK_SIZE) * stride_cache_block + (slot % BLOCK_SIZE) * stride_cache_offset
        _rotate_heads(key, stride_key_head, NUM_KEY_HEADS, key_norm_ptr, eps, cos, sin, offsets, mask_half,
                      key_cache_ptr + cache_offset, stride_cache_head, stored_heads, HALF, KEY_HEADS_PAD, HAS_NORM,
                      SATURATE)
        heads = tl.arange(0, KEY_HEADS_PAD)
        dims = tl.arange(0, 2 * HALF_PAD)
        mask = (heads[:, None] < stored_heads) & (dims[None, :] < 2 * HALF)
        values = tl.load(value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :],
                         mask=mask, other=0.0)
        values = saturate_for_cache(values, SATURATE)
        tl.store(value_cache_ptr + cache_offset + heads[:, None] * stride_cache_head + dims[None, :],
                 values.to(value_cache_ptr.dtype.element_ty), mask=mask)
    else:
        _rotate_heads(key, stride_key_head, NUM_KEY_HEADS, key_norm_ptr, eps, cos, sin, offsets, mask_half,
                      key, stride_key_head, NUM_KEY_HEADS, HALF, KEY_HEADS_PAD, HAS_NORM, False)


def rotary_embedding_(
    query: torch.Tensor,  # [T, Hq, D], may be a strided view (a slice of the fused qkv output)
    key: torch.Tensor,  # [T, Hkv, D]
    cos: torch.Tensor,  # [T, D // 2] float32
    sin: torch.Tensor,
    query_norm_weight: torch.Tensor | None = None,  # [D]: per-head RMSNorm before rotating (Qwen3)
    key_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> None:
    """Rotate ``query`` and ``key`` in place by per-token angles (Hugging Face's half-split layout).

    With ``cache = (value, key_cache, value_cache, slot_mapping)`` the rotated keys go to each token's cache
    slot instead (``key`` is left as it was) and the values are copied beside them, as ``write_kv_cache``
    would: the separate cache-write launch is saved.
    """
    num_tokens, num_query_heads, head_dim = query.shape
    if key.shape[0] != num_tokens or key.shape[2] != head_dim or head_dim % 2:
        raise ValueError(f"rotary_embedding_: query {tuple(query.shape)} and key {tuple(key.shape)} must be "
                         "[T, heads, D] with the same T and an even D")
    if query.stride(2) != 1 or key.stride(2) != 1:
        raise ValueError("rotary_embedding_: head dims must be contiguous")
    half = head_dim // 2
    if cos.shape != (num_tokens, half) or sin.shape != cos.shape or cos.stride() != sin.stride():
        raise ValueError(f"rotary_embedding_: cos/sin must be [T, D/2] = {(num_tokens, half)}, got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.stride(1) != 1:
        raise ValueError("rotary_embedding_: cos/sin rows must be contiguous")
    has_norm = query_norm_weight is not None
    if has_norm != (key_norm_weight is not None):
        raise ValueError("rotary_embedding_: give both query and key norm weights, or neither")
    if cache is not None:
        value, key_cache, value_cache, slot_mapping = cache
        if value.shape != key.shape or value.stride(2) != 1:
            raise ValueError(f"rotary_embedding_: value {tuple(value.shape)} must match key {tuple(key.shape)}")
        check_cache_pair("rotary_embedding_", key_cache, value_cache)
        if key_cache.shape[2:] != key.shape[1:]:
            raise ValueError(f"rotary_embedding_: cache {tuple(key_cache.shape)} does not fit key {tuple(key.shape)}")
        if slot_mapping.shape[0] != num_tokens:
            raise ValueError(f"rotary_embedding_: {slot_mapping.shape[0]} slots for {num_tokens} rows")
    if num_tokens == 0:
        return
    norm_query = query_norm_weight if has_norm else cos
    norm_key = key_norm_weight if has_norm else cos
    num_key_heads = key.shape[1]
    half_pad = next_power_of_2(half)
    use_pdl = pdl_launch(query.device)
    if cache is None:
        value, key_cache, value_cache, slot_mapping = key, key, key, cos  # unused
    _rotary_kernel[(num_tokens,)](
        query, key, cos, sin, norm_query, norm_key, eps,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos.stride(0),
        value, key_cache, value_cache, slot_mapping, value.stride(0), value.stride(1),
        key_cache.stride(0) if cache else 0, key_cache.stride(1) if cache else 0, key_cache.stride(2) if cache else 0,
        NUM_QUERY_HEADS=num_query_heads, NUM_KEY_HEADS=num_key_heads,
        QUERY_HEADS_PAD=next_power_of_2(num_query_heads), KEY_HEADS_PAD=next_power_of_2(num_key_heads),
        HALF=half, HALF_PAD=half_pad, HAS_NORM=has_norm, USE_PDL=use_pdl, WRITE_CACHE=cache is not None,
        BLOCK_SIZE=key_cache.shape[1] if cache else 1, SATURATE=cache is not None and key_cache.dtype == torch.float8_e4m3fn,
        num_warps=4 if num_query_heads * half_pad >= 1024 else 1, launch_pdl=use_pdl,
    )
