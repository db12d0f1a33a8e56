"""Prefill/extend attention over the paged KV cache: causal, variable length.

Every sequence's new rows (a whole prompt, a chunk starting mid-sequence, or
the tail after a prefix-cache hit) attend over keys ``0 .. own position``, all
read from the cache: the backend writes the new K/V there first, so earlier
chunks, shared prefix blocks and the new rows are one uniform gather.

Design: a host-built list of tiles ``(sequence, first new row)`` keeps the grid
free of empty programs whatever the mix of lengths; each program takes
``BLOCK_M // group`` consecutive new rows times the ``group`` query heads that
share one KV head, flattened into ``BLOCK_M`` dot rows (row r -> token r//group,
head r%group), so each K/V tile is loaded once per group. Keys wholly before
the tile's first row need no causal mask (first loop); only the last few key
tiles are masked (second loop). Softmax is online, float32, base 2.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from joule.kernels.common import LOG2_E, dot_precision, interpreting, next_power_of_2, tile_dot


@triton.jit
def _load_rows(pointers, row_valid, dim_valid, MASK_ROWS: tl.constexpr, MASK_DIMS: tl.constexpr):
    """Load a [rows, dims] tile, masking only what may be out of range (full tiles load unmasked)."""
    if MASK_ROWS and MASK_DIMS:
        tile = tl.load(pointers, mask=row_valid[:, None] & dim_valid[None, :], other=0.0)
    elif MASK_ROWS:
        tile = tl.load(pointers, mask=row_valid[:, None], other=0.0)
    elif MASK_DIMS:
        tile = tl.load(pointers, mask=dim_valid[None, :], other=0.0)
    else:
        tile = tl.load(pointers)
    return tile


@triton.jit
def _attend_key_range(
    query, running_max, running_sum, accumulator, query_positions,
    key_cache_ptr, value_cache_ptr, table_row, key_start, key_end, kv_head, scale_log2,
    stride_cache_block, stride_cache_offset, stride_cache_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    DIAGONAL: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """Online-softmax update over keys [key_start, key_end). Off the diagonal every tile is full
    and before every query row, so no mask is built at all."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM
    for start in range(key_start, key_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < key_end
        if DIAGONAL:
            block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        else:
            block_ids = tl.load(table_row + positions // BLOCK_SIZE).to(tl.int64)
        token_pointers = (block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_offset
                          + kv_head * stride_cache_head)[:, None] + dims[None, :]
        keys = _load_rows(key_cache_ptr + token_pointers, valid, dim_valid, DIAGONAL, HEAD_DIM != HEAD_DIM_PAD)
        scores = tile_dot(query, tl.trans(keys.to(query.dtype)), DOT_PRECISION, UPCAST_DOT) * scale_log2
        if DIAGONAL:
            allowed = valid[None, :] & (positions[None, :] <= query_positions[:, None])
            scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp2(running_max - new_max)
        probabilities = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probabilities, 1)
        values = _load_rows(value_cache_ptr + token_pointers, valid, dim_valid, DIAGONAL, HEAD_DIM != HEAD_DIM_PAD)
        values = values.to(query.dtype)
        attended = tile_dot(probabilities.to(values.dtype), values, DOT_PRECISION, UPCAST_DOT)
        accumulator = accumulator * correction[:, None] + attended
        running_max = new_max
    return running_max, running_sum, accumulator


# Values that change from step to step are not specialised on (Triton compiles a variant per "== 1" /
# "divisible by 16" pattern of each integer argument: ~1 s each, paid inside a serving step).
@triton.jit(do_not_specialize=["num_tiles", "stride_table_sequence"])
def _prefill_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, sequence_lengths_ptr,
    query_start_locations_ptr, tiles_ptr, output_ptr, scale_log2, num_tiles,
    stride_query_token, stride_query_head, stride_output_token, stride_output_head,
    stride_cache_block, stride_cache_offset, stride_cache_head, stride_table_sequence,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS_PER_TILE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    sequence = tl.load(tiles_ptr + tile)
    first_row = tl.load(tiles_ptr + num_tiles + tile)
    query_start = tl.load(query_start_locations_ptr + sequence).to(tl.int64)
    query_length = (tl.load(query_start_locations_ptr + sequence + 1) - query_start).to(tl.int32)
    sequence_length = tl.load(sequence_lengths_ptr + sequence)
    context_length = sequence_length - query_length
    if first_row >= query_length:
        return  # a spare tile of a padded (graph-captured) step: nothing to compute or write

    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM_PAD)
    tokens = first_row + rows // GROUP
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < ROWS_PER_TILE * GROUP) & (tokens < query_length)
    io_mask = row_mask[:, None] & (dims[None, :] < HEAD_DIM)
    query = tl.load(
        query_ptr + (query_start + tokens)[:, None] * stride_query_token + heads[:, None] * stride_query_head
        + dims[None, :], mask=io_mask, other=0.0,
    )
    query_positions = context_length + tokens
    table_row = block_tables_ptr + sequence.to(tl.int64) * stride_table_sequence
    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    accumulator = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)

    first_position = context_length + first_row
    unmasked_end = (first_position // BLOCK_N) * BLOCK_N  # every key before it precedes every row
    key_end = tl.minimum(sequence_length, first_position + ROWS_PER_TILE)
    running_max, running_sum, accumulator = _attend_key_range(
        query, running_max, running_sum, accumulator, query_positions,
        key_cache_ptr, value_cache_ptr, table_row, 0, unmasked_end, kv_head, scale_log2,
        stride_cache_block, stride_cache_offset, stride_cache_head,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, UPCAST_DOT,
    )
    running_max, running_sum, accumulator = _attend_key_range(
        query, running_max, running_sum, accumulator, query_positions,
        key_cache_ptr, value_cache_ptr, table_row, unmasked_end, key_end, kv_head, scale_log2,
        stride_cache_block, stride_cache_offset, stride_cache_head,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, UPCAST_DOT,
    )
    output = accumulator / running_sum[:, None]
    tl.store(
        output_ptr + (query_start + tokens)[:, None] * stride_output_token + heads[:, None] * stride_output_head
        + dims[None, :], output.to(output_ptr.dtype.element_ty), mask=io_mask,
    )


def prefill_config(group: int, head_dim: int, dtype: torch.dtype) -> dict:
    """Launch shape. bf16, head_dim 64: (128, 64, 8 warps, 3 stages) was fastest of 24 configs on an
    H200 (8k prompt, 0.88 ms vs 1.05 for 4 warps/2 stages). On an H100, (64, 64, 4, 2) timed 9-10 %
    faster per kernel at workload 3's prompt step but ran workload 3 1-7 % slower end to end in three
    alternated rounds (docs/benchmarks.md 2026-12-06 (l)), so the default stays. float32 and wide heads
    take smaller tiles to fit shared memory."""
    head_dim_pad = max(16, next_power_of_2(head_dim))
    if dtype == torch.float32 or head_dim_pad > 128:
        config = dict(block_m=64, block_n=32, num_warps=4, num_stages=2)
    else:
        config = dict(block_m=128, block_n=64, num_warps=8, num_stages=3 if head_dim_pad <= 64 else 2)
    config["block_m"] = max(config["block_m"], next_power_of_2(group))
    return config


def build_tiles(query_lengths: list[int], sequence_lengths: list[int], rows_per_tile: int,
                device: torch.device) -> torch.Tensor:
    """int32 ``[2, num_tiles]``: (sequence index, first new row), the longest key ranges first."""
    query_lengths_np = np.asarray(query_lengths, dtype=np.int64)
    tiles_per_sequence = -(-query_lengths_np // rows_per_tile)
    sequences = np.repeat(np.arange(len(query_lengths_np)), tiles_per_sequence)
    tile_starts = np.arange(len(sequences)) - np.repeat(np.cumsum(tiles_per_sequence) - tiles_per_sequence,
                                                        tiles_per_sequence)
    first_rows = tile_starts * rows_per_tile
    contexts = np.asarray(sequence_lengths, dtype=np.int64) - query_lengths_np
    order = np.argsort(-(contexts[sequences] + first_rows), kind="stable")
    tiles = torch.from_numpy(np.stack([sequences[order], first_rows[order]]).astype(np.int32))
    if device.type == "cuda":
        return tiles.pin_memory().to(device, non_blocking=True)
    return tiles.to(device)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D], already holding the new rows
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    query_start_locations: torch.Tensor,  # [S + 1], device
    sequence_lengths: torch.Tensor,  # [S] int32, device
    scale: float,
    tiles: torch.Tensor | None = None,  # from build_tiles with rows_per_tile(); built here if None
    query_lengths: list[int] | None = None,  # host lists, needed only when tiles is None
    host_sequence_lengths: list[int] | None = None,
    output: torch.Tensor | None = None,
    launch: dict | None = None,  # overrides of block_m / block_n / num_warps / num_stages (tuning sweeps)
) -> torch.Tensor:
    """Causal attention of every sequence's new rows over its cached tokens up to each row's position."""
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads != 0 or key_cache.shape[3] != head_dim:
        raise ValueError(f"paged_prefill_attention: query {tuple(query.shape)} does not fit cache "
                         f"{tuple(key_cache.shape)} (query heads must be a multiple of KV heads)")
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride() != key_cache.stride():
        raise ValueError("paged_prefill_attention: head dims must be contiguous; K and V caches alike")
    group = num_heads // num_kv_heads
    default = prefill_config(group, head_dim, query.dtype)
    launch = {**default, **(launch or {})}
    block_m, block_n = max(launch["block_m"], next_power_of_2(group)), launch["block_n"]
    if tiles is not None and block_m != default["block_m"] and launch.get("tile_rows") != block_m // group:
        raise ValueError("paged_prefill_attention: a block_m override needs tiles built here (tiles=None) or for it "
                         "(build_tiles with block_m // group rows, and launch['tile_rows'] saying so)")
    if tiles is None:
        if query_lengths is None or host_sequence_lengths is None:
            raise ValueError("paged_prefill_attention: pass tiles, or the host query/sequence lengths")
        tiles = build_tiles(query_lengths, host_sequence_lengths, block_m // group, query.device)
    if output is None:
        output = torch.empty_like(query)
    num_tiles = tiles.shape[1]
    if num_tiles == 0:
        return output
    _prefill_kernel[(num_tiles, num_kv_heads)](
        query, key_cache, value_cache, block_tables, sequence_lengths, query_start_locations, tiles, output,
        scale * LOG2_E, num_tiles,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=head_dim, HEAD_DIM_PAD=max(16, next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        ROWS_PER_TILE=block_m // group, DOT_PRECISION=dot_precision(query.dtype),
        UPCAST_DOT=interpreting(),
        num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    return output


def rows_per_tile(group: int, head_dim: int, dtype: torch.dtype) -> int:
    """New rows one prefill program covers (what build_tiles needs)."""
    return prefill_config(group, head_dim, dtype)["block_m"] // group
