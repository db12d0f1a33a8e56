"""Decode attention over the paged KV cache: one query row per sequence.

Design (flash-decoding):
- one program per (sequence, KV head, split): it loads the query rows of all
  ``group`` query heads sharing that KV head (padded to 16 rows for ``tl.dot``),
  so every K/V byte is read once per group, not once per query head;
- each sequence's own context is cut into up to ``num_splits`` ranges (of at
  least ``min_split_length`` tokens, sized from that sequence's length on the
  device) so a small batch with long contexts still fills the GPU, also inside
  a CUDA graph captured for ``max_model_len``; each program runs an
  online softmax (float32, base 2) over its range and writes a normalised
  partial output plus its log-sum-exp;
- a second kernel merges the splits per (sequence, query head). With a single
  split the first kernel writes the final output directly and no merge runs.
Tokens are gathered position by position through the block table, so any
cache block size works.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import (
    LOG2_E,
    device_capability,
    dot_precision,
    interpreting,
    next_power_of_2,
    pdl_launch,
    prefetch_l2,
    tile_dot,
    wait_for_previous_grid,
)

# Below this another split costs more than it gains. H200, batch-1 Llama-3.2-1B decode at 128-384 tokens:
# 128 gave 1141.6 tok/s against 1105.8 for 256 (`joule bench latency`; measured while an in-kernel split merge,
# since taken out, replaced the merge launch).
MIN_SPLIT_TOKENS = 128
MAX_SPLITS = 64


@triton.jit
def _sequence_and_row(item, sequence_ids_ptr, query_start_locations_ptr, HAS_SEQUENCE_IDS: tl.constexpr):
    """Which sequence a program serves and its query/output row: identity for decode-only steps,
    looked up for the decode sequences of a mixed step."""
    if HAS_SEQUENCE_IDS:
        sequence = tl.load(sequence_ids_ptr + item)
        row = tl.load(query_start_locations_ptr + sequence).to(tl.int64)
    else:
        sequence = item
        row = item.to(tl.int64)
    return sequence, row


@triton.jit
def _split_length(sequence_length, min_split_length, num_splits, BLOCK_N: tl.constexpr):
    """Tokens per split for this sequence: its length over ``num_splits``, whole tiles, at least
    ``min_split_length`` (a multiple of BLOCK_N), so short sequences use fewer splits."""
    length = tl.cdiv(tl.cdiv(sequence_length, num_splits), BLOCK_N) * BLOCK_N
    return tl.maximum(length, min_split_length)


@triton.jit
def _e4m3_to_f16(raw):
    """fp8 e4m3 bytes (``raw``, uint8) to fp16 with the hardware's paired convert (sm_89+), opaque to the
    compiler: converted in registers, the tile reaches the dot through shared memory as 16-bit data
    (``ldmatrix``) instead of byte by byte (ptx of the plain ``.to()`` path: 128 ``ld.shared.b8`` a tile)."""
    return tl.inline_asm_elementwise(
        asm="""{
        .reg .b16 low, high;
        mov.b32 {low, high}, $2;
        cvt.rn.f16x2.e4m3x2 $0, low;
        cvt.rn.f16x2.e4m3x2 $1, high;
        }""",
        constraints="=r,=r,r", args=[raw], dtype=tl.float16, is_pure=False, pack=4,
    )


@triton.jit
def prefetch_context_tile(key_cache_ptr, value_cache_ptr, table_row, start, end, kv_head,
                          stride_cache_block, stride_cache_offset, stride_cache_head, BLOCK_SIZE: tl.constexpr,
                          BLOCK_N: tl.constexpr, PREFETCH_LINES: tl.constexpr, LINE_ELEMENTS: tl.constexpr):
    """Ask L2 for the K and V lines of one KV head's tokens ``start .. start + BLOCK_N`` (below ``end``) without
    holding registers. Before a PDL wait only: L2 is coherent, so a token an earlier kernel of the step writes
    still reads correctly later."""
    positions = start + tl.arange(0, BLOCK_N)
    valid = positions < end
    block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    lines = (block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_offset
             + kv_head * stride_cache_head)[:, None] + (tl.arange(0, PREFETCH_LINES) * LINE_ELEMENTS)[None, :]
    prefetch_l2(key_cache_ptr + lines, valid[:, None])
    prefetch_l2(value_cache_ptr + lines, valid[:, None])


@triton.jit
def attend_context_range(
    query, key_cache_ptr, value_cache_ptr, table_row, start_position, end_position, kv_head, scale_log2,
    stride_cache_block, stride_cache_offset, stride_cache_head, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr, FP8_ASM: tl.constexpr,
):
    """Online softmax (float32, base 2) of ``query``'s rows (``[GROUP_PAD, HEAD_DIM_PAD]``, one KV head's group)
    over that head's cached tokens ``start_position .. end_position``, gathered through the block table row.
    Returns the unnormalised accumulator, the running max and the running sum."""
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    accumulator = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for start in range(start_position, end_position, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < end_position
        block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        token_offsets = (block_ids * stride_cache_block + (positions % BLOCK_SIZE) * stride_cache_offset
                         + kv_head * stride_cache_head)
        kv_mask = valid[:, None] & dim_mask[None, :]
        keys = tl.load(key_cache_ptr + token_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if FP8_ASM:
            keys = _e4m3_to_f16(keys.to(tl.uint8, bitcast=True))
        scores = tile_dot(query, tl.trans(keys.to(query.dtype)), DOT_PRECISION, UPCAST_DOT) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp2(running_max - new_max)
        probabilities = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probabilities, 1)
        values = tl.load(value_cache_ptr + token_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        if FP8_ASM:
            values = _e4m3_to_f16(values.to(tl.uint8, bitcast=True))
        values = values.to(query.dtype)
        attended = tile_dot(probabilities.to(values.dtype), values, DOT_PRECISION, UPCAST_DOT)
        accumulator = accumulator * correction[:, None] + attended
        running_max = new_max
    return accumulator, running_max, running_sum


# Step-to-step values are not specialised on: each "== 1" / "divisible by 16" pattern is a ~1 s compile.
@triton.jit(do_not_specialize=["min_split_length", "num_splits", "stride_table_sequence"])
def _decode_partial_kernel(
    query_ptr, key_cache_ptr, value_cache_ptr, block_tables_ptr, sequence_lengths_ptr,
    sequence_ids_ptr, query_start_locations_ptr, output_ptr, partial_output_ptr, partial_lse_ptr,
    scale_log2, min_split_length, num_splits,
    stride_query_token, stride_query_head, stride_output_token, stride_output_head,
    stride_cache_block, stride_cache_offset, stride_cache_head, stride_table_sequence,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DIRECT_OUTPUT: tl.constexpr,
    HAS_SEQUENCE_IDS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    FP16_DOT: tl.constexpr, FP8_ASM: tl.constexpr, HEADS_FIRST: tl.constexpr, USE_PDL: tl.constexpr,
    PREFETCH_LINES: tl.constexpr, LINE_ELEMENTS: tl.constexpr,
):
    # HEADS_FIRST: programs launched in a row serve the KV heads of one sequence, which lie side by side in each
    # token's cache row, instead of one head of neighbouring sequences (scattered blocks).
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        item = tl.program_id(1)  # index among the decode sequences of this launch
        num_kv_heads = tl.num_programs(0)
    else:
        item = tl.program_id(0)
        kv_head = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    split = tl.program_id(2)
    sequence, row = _sequence_and_row(item, sequence_ids_ptr, query_start_locations_ptr, HAS_SEQUENCE_IDS)
    sequence_length = tl.load(sequence_lengths_ptr + sequence)
    split_length = _split_length(sequence_length, min_split_length, num_splits, BLOCK_N)
    split_start = split * split_length
    split_end = tl.minimum(sequence_length, split_start + split_length)
    table_row = block_tables_ptr + sequence.to(tl.int64) * stride_table_sequence
    if PREFETCH_LINES > 0:
        # Lengths, block tables and the cache lines of earlier tokens are in place before this step's kernels
        # run: pull the first tile's lines into L2 while the previous kernel finishes.
        prefetch_context_tile(key_cache_ptr, value_cache_ptr, table_row, split_start, split_end, kv_head,
                              stride_cache_block, stride_cache_offset, stride_cache_head, BLOCK_SIZE, BLOCK_N,
                              PREFETCH_LINES, LINE_ELEMENTS)
    wait_for_previous_grid(USE_PDL)

    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    row_mask = rows < GROUP
    dim_mask = dims < HEAD_DIM
    heads = kv_head * GROUP + rows
    query = tl.load(
        query_ptr + row * stride_query_token + heads[:, None] * stride_query_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :], other=0.0,
    )
    if FP16_DOT or FP8_ASM:  # fp8 tiles widen to fp16 in one instruction per pair (bf16 takes several)
        query = query.to(tl.float16)
    accumulator, running_max, running_sum = attend_context_range(
        query, key_cache_ptr, value_cache_ptr, table_row, split_start, split_end, kv_head, scale_log2,
        stride_cache_block, stride_cache_offset, stride_cache_head, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD, BLOCK_SIZE,
        BLOCK_N, DOT_PRECISION, UPCAST_DOT, FP8_ASM)

    denominator = tl.where(running_sum > 0, running_sum, 1.0)  # a length-0 (padding) row writes zeros
    out_offsets = row * stride_output_token + heads[:, None] * stride_output_head + dims[None, :]
    out_mask = row_mask[:, None] & dim_mask[None, :]
    if DIRECT_OUTPUT:
        tl.store(output_ptr + out_offsets, (accumulator / denominator[:, None]).to(output_ptr.dtype.element_ty),
                 mask=out_mask)
    elif split_start < sequence_length:
        # partial layout: [items, Hq, num_splits, HEAD_DIM_PAD] and [items, Hq, num_splits]
        head_index = item.to(tl.int64) * (num_kv_heads * GROUP) + heads
        lse_offsets = head_index * num_splits + split
        tl.store(partial_lse_ptr + lse_offsets, running_max + tl.log2(running_sum), mask=row_mask)
        output = accumulator / denominator[:, None]
        tl.store(partial_output_ptr + lse_offsets[:, None] * HEAD_DIM_PAD + dims[None, :], output,
                 mask=row_mask[:, None])


@triton.jit(do_not_specialize=["min_split_length", "num_splits"])
def _decode_merge_kernel(
    output_ptr, partial_output_ptr, partial_lse_ptr, sequence_lengths_ptr, sequence_ids_ptr,
    query_start_locations_ptr, min_split_length, num_splits, stride_output_token, stride_output_head,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr, HAS_SEQUENCE_IDS: tl.constexpr,
    BLOCK_N: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    item = tl.program_id(0)
    head = tl.program_id(1)
    sequence, row = _sequence_and_row(item, sequence_ids_ptr, query_start_locations_ptr, HAS_SEQUENCE_IDS)
    sequence_length = tl.load(sequence_lengths_ptr + sequence)
    used_splits = tl.cdiv(sequence_length, _split_length(sequence_length, min_split_length, num_splits, BLOCK_N))
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    split_mask = splits < used_splits
    base = (item.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    lse = tl.load(partial_lse_ptr + base + splits, mask=split_mask, other=float("-inf"))
    largest = tl.max(lse, 0)
    largest = tl.where(largest == float("-inf"), 0.0, largest)  # no splits at all: a padding row
    weights = tl.exp2(lse - largest)
    weights = weights / tl.maximum(tl.sum(weights, 0), 1e-30)  # no splits (padding row): zeros
    partial = tl.load(partial_output_ptr + (base + splits)[:, None] * HEAD_DIM_PAD + dims[None, :],
                      mask=split_mask[:, None], other=0.0)
    output = tl.sum(partial * weights[:, None], 0)
    tl.store(output_ptr + row * stride_output_token + head * stride_output_head + dims,
             output.to(output_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def choose_num_splits(num_sequences: int, num_kv_heads: int, max_sequence_length: int, num_processors: int) -> int:
    """Enough splits to give the GPU about two programs per processor, each over >= MIN_SPLIT_TOKENS.

    Graph-timed on an H200 (8 KV heads, head_dim 64, bf16), the best of 1..32 splits vs this choice:
    B=1 x 8k: 32 best (9.4 us; 88 us unsplit), chosen 32; B=16 x 4k: 4 best (39 us), chosen 3;
    B=64 x 1k and B=256 x 1k: 1 best, chosen 1. A wave-balanced variant (more splits where the programs leave the
    last wave of processors mostly idle) measured the same on workload 2 (H100, 2026-12-06) and was removed.
    """
    wanted = -(-2 * num_processors // max(1, num_sequences * num_kv_heads))
    by_length = max(1, max_sequence_length // MIN_SPLIT_TOKENS)
    return max(1, min(wanted, by_length, MAX_SPLITS))


def native_fp8_convert(device: torch.device) -> bool:
    """The GPU converts e4m3 pairs to fp16 in one instruction (sm_89 and newer); never under the interpreter."""
    if device.type != "cuda" or interpreting():
        return False
    return device_capability(device) >= (8, 9)


def paged_decode_attention(
    query: torch.Tensor,  # [S, Hq, D], one row per sequence
    key_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks] int32
    sequence_lengths: torch.Tensor,  # [S] int32, device
    max_sequence_length: int,  # host value: sizes the split grid without a device sync
    scale: float,
    num_splits: int = 1,
    output: torch.Tensor | None = None,
    min_split_tokens: int | None = None,  # None: one tile, so a fixed num_splits splits even short contexts
    launch: dict | None = None,  # overrides of block_n / num_warps / num_stages (tuning sweeps)
    sequence_ids: torch.Tensor | None = None,  # int32 [N]: only these sequences, rows from query_start_locations
    query_start_locations: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's single new row over its first ``sequence_length`` cached tokens.

    Without ``sequence_ids`` row ``i`` of ``query`` belongs to sequence ``i``. With them (the decodes
    of a mixed step) sequence ``sequence_ids[j]`` reads and writes row ``query_start_locations[seq]``.
    A sequence of length 0 (a padding row) gets zeros.
    """
    num_rows, num_heads, head_dim = query.shape
    num_sequences = num_rows if sequence_ids is None else sequence_ids.shape[0]
    if sequence_ids is not None and query_start_locations is None:
        raise ValueError("paged_decode_attention: sequence_ids need query_start_locations")
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    if num_heads % num_kv_heads != 0 or key_cache.shape[3] != head_dim:
        raise ValueError(f"paged_decode_attention: query {tuple(query.shape)} does not fit cache "
                         f"{tuple(key_cache.shape)} (query heads must be a multiple of KV heads)")
    if query.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride() != key_cache.stride():
        raise ValueError("paged_decode_attention: head dims must be contiguous; K and V caches alike")
    if output is None:
        output = torch.empty_like(query)
    if num_sequences == 0:
        return output
    group = num_heads // num_kv_heads
    head_dim_pad = max(16, next_power_of_2(head_dim))
    # head_dim 64, bf16, B=64 x 4k context on an H200: block_n 128 read at 3.8 TB/s, 64 at 3.5 TB/s.
    # An fp8 cache at head_dim 128 (benchmarks/gpu/decode_sweep.py, H100, graph-timed, one layer of
    # Qwen3-0.6B): 128-token tiles and 3 stages take 253 us at B=256 x 1k (64-token tiles: 313 us; the
    # bf16 cache: 359 us) and 280 us at B=64 x 4k (389 us; bf16 356 us).
    fp8 = key_cache.element_size() == 1
    block_n = 128 if head_dim_pad <= (128 if fp8 else 64) else 64 if head_dim_pad <= 128 else 32
    # fp8 caches: fp8_asm (the default where the GPU has the convert) widens tiles in registers and dots in fp16
    # (see _e4m3_to_f16); fp16_dot keeps `.to()` but dots in fp16. H200, workload 2's layer: 232 / 233 us
    # against 249 us for `.to()` with bf16 dots (benchmarks/gpu/fp8_decode_check.py).
    # heads_first: the grid walks the KV heads of a sequence before the next sequence, whose head rows lie side by
    # side in each token's cache row. H100, graph-timed, 16-token token-major blocks spread over a cache 20x the
    # blocks read (benchmarks/gpu/decode_sweep.py --w3 and decode_layouts.py, three calls on three machines):
    # workload 3's step (Llama-3.2-1B, 256 x 576) 1.1 %, 2.4 % and 4.7 % faster; workload 2's (Qwen3-0.6B,
    # 256 x 1k) 1.0-1.6 % faster in bf16; fp8 caches within 0.3 % either way.
    launch = {"block_n": block_n, "num_warps": 4, "num_stages": 3 if fp8 else 2, "fp16_dot": False,
              "fp8_asm": fp8 and native_fp8_convert(query.device), "heads_first": True, **(launch or {})}
    if launch["fp8_asm"] and (not fp8 or interpreting()):
        raise ValueError("paged_decode_attention: fp8_asm needs an fp8 cache on a CUDA GPU (sm_89+)")
    block_n = launch["block_n"]
    min_split_length = -(-max(1, min_split_tokens or block_n) // block_n) * block_n
    num_splits = max(1, min(int(num_splits), -(-max(1, max_sequence_length) // min_split_length)))
    direct = num_splits == 1
    if direct:
        partial_output = partial_lse = output  # unused
    else:
        partial_output = torch.empty((num_sequences, num_heads, num_splits, head_dim_pad),
                                     dtype=torch.float32, device=query.device)
        partial_lse = torch.empty((num_sequences, num_heads, num_splits), dtype=torch.float32, device=query.device)
    use_pdl = pdl_launch(query.device)
    # Under PDL the first tile's cache lines are prefetched into L2 while the previous kernel finishes.
    prefetch_lines = max(1, head_dim * key_cache.element_size() // 128) if use_pdl else 0
    grid = ((num_kv_heads, num_sequences, num_splits) if launch["heads_first"]
            else (num_sequences, num_kv_heads, num_splits))
    _decode_partial_kernel[grid](
        query, key_cache, value_cache, block_tables, sequence_lengths,
        sequence_ids if sequence_ids is not None else sequence_lengths,
        query_start_locations if query_start_locations is not None else sequence_lengths,
        output, partial_output, partial_lse,
        scale * LOG2_E, min_split_length, num_splits,
        query.stride(0), query.stride(1), output.stride(0), output.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size, BLOCK_N=block_n, DIRECT_OUTPUT=direct,
        HAS_SEQUENCE_IDS=sequence_ids is not None, DOT_PRECISION=dot_precision(query.dtype), UPCAST_DOT=interpreting(),
        FP16_DOT=bool(launch["fp16_dot"]) and fp8, FP8_ASM=bool(launch["fp8_asm"]),
        HEADS_FIRST=bool(launch["heads_first"]), USE_PDL=use_pdl,
        PREFETCH_LINES=prefetch_lines, LINE_ELEMENTS=128 // key_cache.element_size(), num_warps=launch["num_warps"],
        num_stages=launch["num_stages"], launch_pdl=use_pdl,
    )
    if not direct:
        _decode_merge_kernel[(num_sequences, num_heads)](
            output, partial_output, partial_lse, sequence_lengths,
            sequence_ids if sequence_ids is not None else sequence_lengths,
            query_start_locations if query_start_locations is not None else sequence_lengths,
            min_split_length, num_splits, output.stride(0), output.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=next_power_of_2(num_splits),
            HAS_SEQUENCE_IDS=sequence_ids is not None, BLOCK_N=block_n, USE_PDL=use_pdl,
            num_warps=1 if head_dim_pad <= 64 else 2, launch_pdl=use_pdl,
        )
    return output
