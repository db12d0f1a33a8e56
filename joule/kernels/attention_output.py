"""Batch-1 decode attention fused with the output projection: one launch where there were three.

Why: a batch-1 decode layer on an H100/H200 is a chain of dependent kernels, and each hop between two costs
~2-4 us beyond its bytes (docs/benchmarks.md, H200 2026-12-04 (f)): the attention (partial + split merge) and the
o projection added ~12 us a layer there for ~2 us of weight reads.

How: program (KV head g, row block j) runs the whole-context attention of g's query heads (an online softmax
over the paged cache, as ``paged_decode`` does without splits), rounds it to the model's dtype as the unfused
path stores it, and multiplies it with W_o's rows of block j and g's columns. Each row block then sums its
partials in a fixed order of g (the last of its programs to finish, counted with an atomic, does it), so the
result does not depend on which program ran first. W_o's tile is loaded before the wait for the previous kernel
(no kernel of a step writes weights). The attention is repeated by the row blocks of a KV head: cheap from L2 at
short contexts, which is where the backend uses this kernel (``fits_fused_attention_output``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import (
    LOG2_E,
    dot_precision,
    interpreting,
    next_power_of_2,
    pdl_launch,
    wait_for_previous_grid,
)
from joule.kernels.paged_decode import attend_context_range, prefetch_context_tile

# The weight tile a program holds in registers (elements): 128 rows x 256 columns with 8 warps.
TILE_ELEMENTS = 32768
MAX_GROUP_COLUMNS = 256  # query heads per KV head x head_dim: wider groups would need a smaller row block
# Longest context the fused kernel is chosen for (each row block re-reads its KV head's context from L2).
FUSED_MAX_CONTEXT = 1024


@triton.jit
def _attention_output_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_table_ptr, sequence_length_ptr, weight_ptr,
    attended_ptr, partial_ptr, counter_ptr, output_ptr, scale_log2,
    stride_cache_block, stride_cache_offset, stride_cache_head,
    NUM_KV_HEADS: tl.constexpr, OUT_FEATURES: tl.constexpr, IN_FEATURES: tl.constexpr,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    COLUMNS_PAD: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr, LINE_ELEMENTS: tl.constexpr,
):
    kv_head = tl.program_id(0)
    row_block = tl.program_id(1)
    out_rows = row_block * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    out_mask = out_rows < OUT_FEATURES
    columns = tl.arange(0, COLUMNS_PAD)
    column_mask = columns < GROUP * HEAD_DIM
    weight = tl.load(weight_ptr + out_rows[:, None].to(tl.int64) * IN_FEATURES + kv_head * (GROUP * HEAD_DIM)
                     + columns[None, :], mask=out_mask[:, None] & column_mask[None, :], other=0.0)
    if PREFETCH_LINES > 0:
        # The length, the block table and the earlier tokens' cache lines are in place before the step's kernels
        # run: row block j asks L2 for the KV head's context tile j, so the row blocks together pull in the whole
        # short context while the previous kernel finishes.
        prefetch_context_tile(key_cache_ptr, value_cache_ptr, block_table_ptr, row_block * BLOCK_N,
                              tl.load(sequence_length_ptr), kv_head, stride_cache_block, stride_cache_offset,
                              stride_cache_head, BLOCK_SIZE, BLOCK_N, PREFETCH_LINES, LINE_ELEMENTS)
    wait_for_previous_grid(USE_PDL)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    query = tl.load(query_ptr + (kv_head * GROUP + rows)[:, None] * HEAD_DIM + dims[None, :],
                    mask=row_mask[:, None] & dim_mask[None, :], other=0.0)
    sequence_length = tl.load(sequence_length_ptr)
    accumulator, running_max, running_sum = attend_context_range(
        query, key_cache_ptr, value_cache_ptr, block_table_ptr, 0, sequence_length, kv_head, scale_log2,
        stride_cache_block, stride_cache_offset, stride_cache_head, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE,
        BLOCK_N, DOT_PRECISION, UPCAST_DOT, False)
    denominator = tl.where(running_sum > 0, running_sum, 1.0)  # an empty context attends to zeros
    attended = (accumulator / denominator[:, None]).to(output_ptr.dtype.element_ty)

    # The group's rows become one flat vector (head by head, as W_o's columns run) through this program's own
    # scratch slot; the barrier makes every thread's store visible to the whole program.
    slot = attended_ptr + (kv_head * tl.num_programs(1) + row_block) * COLUMNS_PAD
    tl.store(slot + rows[:, None] * HEAD_DIM + dims[None, :], attended, mask=row_mask[:, None] & dim_mask[None, :])
    tl.debug_barrier()
    vector = tl.load(slot + columns, mask=column_mask, other=0.0).to(tl.float32)
    partial = tl.sum(weight.to(tl.float32) * vector[None, :], axis=1)
    tl.store(partial_ptr + kv_head * OUT_FEATURES + out_rows, partial, mask=out_mask)
    tl.debug_barrier()
    arrived = tl.atomic_add(counter_ptr + row_block, 1, sem="acq_rel")
    if arrived == NUM_KV_HEADS - 1:  # the row block's last program: every partial is in
        total = tl.zeros([BLOCK_ROWS], tl.float32)
        for group_index in range(NUM_KV_HEADS):  # a fixed order: the sum is the same on every run
            total += tl.load(partial_ptr + group_index * OUT_FEATURES + out_rows, mask=out_mask, other=0.0,
                             cache_modifier=".cg")
        tl.store(output_ptr + out_rows, total.to(output_ptr.dtype.element_ty), mask=out_mask)
        tl.atomic_xchg(counter_ptr + row_block, 0)  # ready for the next launch


def fits_fused_attention_output(num_heads: int, num_kv_heads: int, head_dim: int, weight: torch.Tensor,
                                cache_dtype: torch.dtype, query_dtype: torch.dtype) -> bool:
    """Shapes and dtypes the fused kernel serves: a group narrow enough for one register tile, a cache of the
    query's dtype (no fp8), a 16-bit or float32 weight ``[hidden, num_heads * head_dim]``."""
    group_columns = (num_heads // num_kv_heads) * head_dim
    return (num_heads % num_kv_heads == 0 and next_power_of_2(group_columns) <= MAX_GROUP_COLUMNS
            and cache_dtype == query_dtype and weight.dtype == query_dtype and weight.dim() == 2
            and weight.shape[1] == num_heads * head_dim and weight.is_contiguous())


class FusedAttentionOutputBuffers:
    """Scratch the kernel needs between launches: per-program attention rows, per-KV-head partials and the row
    blocks' arrival counters (zero between launches: each launch's last program resets its own)."""

    def __init__(self, num_kv_heads: int, out_features: int, columns_pad: int, block_rows: int,
                 dtype: torch.dtype, device: torch.device):
        num_blocks = -(-out_features // block_rows)
        self.attended = torch.empty((num_kv_heads * num_blocks, columns_pad), dtype=dtype, device=device)
        self.partials = torch.empty((num_kv_heads, out_features), dtype=torch.float32, device=device)
        self.counters = torch.zeros(num_blocks, dtype=torch.int32, device=device)


def launch_shape(num_heads: int, num_kv_heads: int, head_dim: int, launch: dict | None = None) -> dict:
    """Block sizes and warps (``launch`` overrides them, for sweeps)."""
    columns_pad = next_power_of_2((num_heads // num_kv_heads) * head_dim)
    head_dim_pad = max(16, next_power_of_2(head_dim))
    shape = {"block_rows": max(16, min(128, TILE_ELEMENTS // columns_pad)), "num_warps": 8,
             "block_n": 128 if head_dim_pad <= 64 else 64, "num_stages": 2, "prefetch": True}
    shape.update(launch or {})
    shape["columns_pad"] = columns_pad
    return shape


def decode_attention_output(
    query: torch.Tensor,  # [num_heads, head_dim] or [1, num_heads, head_dim], contiguous
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    value_cache: torch.Tensor,
    block_table: torch.Tensor,  # [max_blocks] int32: the one sequence's blocks
    sequence_length: torch.Tensor,  # [1] int32, device
    weight: torch.Tensor,  # [out_features, num_heads * head_dim]
    scale: float,
    scratch: dict[tuple, FusedAttentionOutputBuffers] | None = None,
    launch: dict | None = None,
) -> torch.Tensor:
    """``attention(query) @ weight.T`` for one decode row: ``[1, out_features]`` in the query's dtype.

    ``scratch``: where the launch's buffers are kept between calls (by shape; a caller's dict, so every layer and
    step of a model reuses one set); without it they are allocated for this call."""
    num_heads, head_dim = query.shape[-2], query.shape[-1]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if not fits_fused_attention_output(num_heads, num_kv_heads, head_dim, weight, key_cache.dtype, query.dtype):
        raise ValueError(f"decode_attention_output: query {tuple(query.shape)}, cache {tuple(key_cache.shape)} "
                         f"{key_cache.dtype}, weight {tuple(weight.shape)} {weight.dtype} are not served")
    if not query.is_contiguous() or key_cache.stride(3) != 1 or value_cache.stride() != key_cache.stride():
        raise ValueError("decode_attention_output: query and head dims must be contiguous; K and V caches alike")
    shape = launch_shape(num_heads, num_kv_heads, head_dim, launch)
    out_features = weight.shape[0]
    key = (num_kv_heads, out_features, shape["columns_pad"], shape["block_rows"], query.dtype, query.device)
    buffers = scratch.get(key) if scratch is not None else None
    if buffers is None:
        buffers = FusedAttentionOutputBuffers(*key)
        if scratch is not None:
            scratch[key] = buffers
    output = torch.empty((1, out_features), dtype=query.dtype, device=query.device)
    use_pdl = pdl_launch(query.device)
    group = num_heads // num_kv_heads
    grid = (num_kv_heads, buffers.counters.shape[0])
    _attention_output_kernel[grid](
        query, key_cache, value_cache, block_table, sequence_length, weight,
        buffers.attended, buffers.partials, buffers.counters, output, scale * LOG2_E,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, OUT_FEATURES=out_features, IN_FEATURES=num_heads * head_dim,
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, next_power_of_2(head_dim)), COLUMNS_PAD=shape["columns_pad"],
        BLOCK_ROWS=shape["block_rows"], BLOCK_SIZE=block_size, BLOCK_N=shape["block_n"],
        DOT_PRECISION=dot_precision(query.dtype), UPCAST_DOT=interpreting(), USE_PDL=use_pdl,
        PREFETCH_LINES=max(1, head_dim * key_cache.element_size() // 128) if use_pdl and shape["prefetch"] else 0,
        LINE_ELEMENTS=128 // key_cache.element_size(), num_warps=shape["num_warps"], num_stages=shape["num_stages"], launch_pdl=use_pdl,
    )
    return output
