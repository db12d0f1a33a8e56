"""Write new key/value rows into the paged KV cache by slot, in one launch.

One program copies one token's keys and values (all KV heads) to
``slot = block_id * block_size + offset``; a negative slot marks a padding row
and is skipped, so a padded (graph-captured) batch needs no host-side trim.
Inputs may be strided views (e.g. split out of a merged QKV projection).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import next_power_of_2, pdl_launch, wait_for_previous_grid

FP8_E4M3_MAX: tl.constexpr = tl.constexpr(448.0)


@triton.jit
def saturate_for_cache(values, SATURATE: tl.constexpr):
    """For an fp8 cache (SATURATE): clamp to its finite range, as torch's cast does, instead of overflowing."""
    if SATURATE:
        values = tl.clamp(values.to(tl.float32), -FP8_E4M3_MAX, FP8_E4M3_MAX)
    return values


def check_cache_pair(caller: str, key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    """The kernels address both caches with the key cache's strides and a contiguous head dimension."""
    if (value_cache.shape != key_cache.shape or value_cache.stride() != key_cache.stride()
            or key_cache.stride(3) != 1):
        raise ValueError(f"{caller}: key and value caches need the same shape and strides, head dims contiguous")


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    stride_key_token, stride_key_head, stride_value_token, stride_value_head,
    stride_cache_block, stride_cache_offset, stride_cache_head,
    BLOCK_SIZE: tl.constexpr, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SATURATE: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)  # before any return: a kernel that never waits breaks the chain
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    cache_offsets = (block_id * stride_cache_block + offset * stride_cache_offset
                     + heads[:, None] * stride_cache_head + dims[None, :])
    token = token.to(tl.int64)
    keys = tl.load(key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :], mask=mask)
    values = tl.load(value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :],
                     mask=mask)
    keys = saturate_for_cache(keys, SATURATE)
    values = saturate_for_cache(values, SATURATE)
    tl.store(key_cache_ptr + cache_offsets, keys.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + cache_offsets, values.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [T, Hkv, D]
    value: torch.Tensor,  # [T, Hkv, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [T] int, negative = skip
) -> None:
    """Copy each row of ``key``/``value`` to its cache slot (cast to the cache dtype)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if value.shape != key.shape or key_cache.shape[2:] != (num_kv_heads, head_dim):
        raise ValueError(
            f"write_kv_cache: key {tuple(key.shape)}, value {tuple(value.shape)} do not fit "
            f"cache {tuple(key_cache.shape)}"
        )
    check_cache_pair("write_kv_cache", key_cache, value_cache)
    if key.stride(2) != 1 or value.stride(2) != 1:
        raise ValueError("write_kv_cache: the head dimension must be contiguous")
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"write_kv_cache: {slot_mapping.shape[0]} slots for {num_tokens} rows")
    if num_tokens == 0:
        return
    use_pdl = pdl_launch(key.device)
    _write_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        BLOCK_SIZE=key_cache.shape[1], NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim,
        HEADS_PAD=next_power_of_2(num_kv_heads), HEAD_DIM_PAD=next_power_of_2(head_dim),
        SATURATE=key_cache.dtype == torch.float8_e4m3fn, USE_PDL=use_pdl,
        num_warps=4 if num_kv_heads * head_dim >= 1024 else 1, launch_pdl=use_pdl,
    )
