"""Decode attention against the KV cache's block size and layout, and a TMA-fed decode kernel (one GPU call, ~2 min).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/decode_layouts.py [out.json]

Why: workload 3's decode attention reads its KV at ~2.65 TB/s (H100, 2026-12-06 (j)), ~27 % of the run, where a
copy reaches ~3.0. The engine's kernel gathers each token's 128-byte head row through the block table (16-token
blocks, token-major: a token's KV heads side by side). Here the same logical KV (one random tensor per shape) is
laid into caches of 16-128-token blocks, token- or head-major, spread over a cache 20x the blocks read (as an
engine's), and read by:
- the engine's kernel (``paged_decode_attention``, strides only), with its grid sequence- or head-first;
- ``_tma_decode_kernel`` below (head-major caches of blocks >= the tile): each K/V tile is one contiguous run of
  one block, loaded by a tensor-memory descriptor over the cache viewed as ``[blocks * heads * block_size, dim]``.
Every output is compared with the engine's default (token-major, 16-token blocks). Prints one line per variant and
writes the rows as JSON. Shapes: workload 3's step (Llama-3.2-1B: 32 / 8 heads of 64, 256 x 576 tokens) and
workload 2's (Qwen3-0.6B: 16 / 8 heads of 128, 256 x 1,024).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import graph_ms  # noqa: E402

from joule.kernels.common import LOG2_E  # noqa: E402
from joule.kernels.paged_decode import paged_decode_attention  # noqa: E402
from joule.perf.json_files import write_json  # noqa: E402

DEVICE = torch.device("cuda")
SPREAD = 20
SHAPES = (("w3 llama-3.2-1b", 256, 576, 32, 8, 64), ("w2 qwen3-0.6b", 256, 1024, 16, 8, 128))


@triton.jit
def _tma_decode_kernel(query_ptr, key_descriptor, value_descriptor, block_tables_ptr, lengths_ptr, output_ptr,
                       scale_log2, stride_query_token, stride_query_head, stride_table,
                       NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                       HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                       HEADS_FIRST: tl.constexpr):
    if HEADS_FIRST:
        kv_head = tl.program_id(0)
        sequence = tl.program_id(1)
    else:
        sequence = tl.program_id(0)
        kv_head = tl.program_id(1)
    length = tl.load(lengths_ptr + sequence)
    table_row = block_tables_ptr + sequence.to(tl.int64) * stride_table
    rows = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM)
    heads = kv_head * GROUP + rows
    offsets = sequence.to(tl.int64) * stride_query_token + heads[:, None] * stride_query_head + dims[None, :]
    query = tl.load(query_ptr + offsets, mask=(rows < GROUP)[:, None], other=0.0)
    running_max = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    running_sum = tl.zeros([GROUP_PAD], tl.float32)
    accumulator = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in tl.range(0, length, BLOCK_N):
        block_id = tl.load(table_row + start // BLOCK_SIZE)
        first_row = (block_id * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + start % BLOCK_SIZE
        valid = start + tl.arange(0, BLOCK_N) < length
        keys = key_descriptor.load([first_row, 0])
        scores = tl.dot(query, tl.trans(keys)) * scale_log2
        scores = tl.where(valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        correction = tl.exp2(running_max - new_max)
        probabilities = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probabilities, 1)
        values = value_descriptor.load([first_row, 0])
        values = tl.where(valid[:, None], values, 0.0)  # rows past the length hold another sequence's tokens
        accumulator = accumulator * correction[:, None] + tl.dot(probabilities.to(values.dtype), values)
        running_max = new_max
    tl.store(output_ptr + offsets, (accumulator / running_sum[:, None]).to(output_ptr.dtype.element_ty),
             mask=(rows < GROUP)[:, None])


def tma_decode(query, key_cache, value_cache, tables, lengths, scale, block_n, num_warps, num_stages,
               heads_first=False):
    """``key_cache``/``value_cache`` head-major ``[blocks, heads, block_size, dim]``, contiguous."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    blocks, kv_heads, block_size, head_dim = key_cache.shape
    descriptors = [TensorDescriptor.from_tensor(cache.view(-1, head_dim), [block_n, head_dim])
                   for cache in (key_cache, value_cache)]
    batch, heads, _ = query.shape
    output = torch.empty_like(query)
    group = heads // kv_heads
    grid = (kv_heads, batch) if heads_first else (batch, kv_heads)
    _tma_decode_kernel[grid](query, *descriptors, tables, lengths, output, scale * LOG2_E, query.stride(0),
                             query.stride(1), tables.stride(0), NUM_KV_HEADS=kv_heads, GROUP=group,
                             GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
                             BLOCK_SIZE=block_size, BLOCK_N=block_n, HEADS_FIRST=heads_first,
                             num_warps=num_warps, num_stages=num_stages)
    return output


def paged_cache(logical: torch.Tensor, block_size: int, head_major: bool, generator: torch.Generator):
    """``logical`` [S, T, H, D] laid into a cache of ``block_size``-token blocks spread SPREAD x over the blocks
    used; returns (cache [blocks, H, bs, D] if head_major else [blocks, bs, H, D], tables [S, blocks a sequence])."""
    sequences, tokens, heads, dim = logical.shape
    per_sequence = -(-tokens // block_size)
    padded = torch.zeros(sequences, per_sequence * block_size, heads, dim, dtype=logical.dtype, device=DEVICE)
    padded[:, :tokens] = logical
    num_blocks = sequences * per_sequence * SPREAD + 1
    chosen = torch.randperm(num_blocks - 1, generator=generator)[: sequences * per_sequence] + 1
    tables = chosen.view(sequences, per_sequence).to(torch.int32).to(DEVICE)
    pieces = padded.view(sequences * per_sequence, block_size, heads, dim)
    if head_major:
        cache = torch.zeros(num_blocks, heads, block_size, dim, dtype=logical.dtype, device=DEVICE)
        cache[chosen.to(DEVICE)] = pieces.transpose(1, 2)
    else:
        cache = torch.zeros(num_blocks, block_size, heads, dim, dtype=logical.dtype, device=DEVICE)
        cache[chosen.to(DEVICE)] = pieces
    return cache, tables


def main() -> None:
    results = []
    for name, batch, context, heads, kv_heads, head_dim in SHAPES:
        generator = torch.Generator().manual_seed(0)
        keys = torch.randn(batch, context, kv_heads, head_dim, generator=generator).to(DEVICE, torch.bfloat16)
        values = torch.randn(batch, context, kv_heads, head_dim, generator=generator).to(DEVICE, torch.bfloat16)
        query = torch.randn(batch, heads, head_dim, generator=generator).to(DEVICE, torch.bfloat16)
        lengths = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
        kv_bytes = 2 * keys.numel() * keys.element_size()
        scale = head_dim**-0.5
        reference = None
        for block_size, head_major in itertools.product((16, 32, 64, 128), (False, True)):
            key_cache, tables = paged_cache(keys, block_size, head_major, torch.Generator().manual_seed(block_size))
            value_cache, _ = paged_cache(values, block_size, head_major, torch.Generator().manual_seed(block_size))
            variants = [("engine kernel", dict(heads_first=False)), ("engine kernel", dict(heads_first=True))]
            if head_major:
                variants += [("tma", dict(block_n=block_n, num_warps=warps, num_stages=stages, heads_first=first))
                             for block_n, warps, stages, first in itertools.product(
                                 (64, 128), (4, 8), (2, 3, 4), (False, True))
                             if block_n <= block_size and block_n * head_dim <= 8192]
            for kernel, launch in variants:
                if kernel == "tma":
                    function = lambda launch=launch: tma_decode(query, key_cache, value_cache, tables, lengths,  # noqa: E731
                                                                scale, **launch)
                else:
                    engine_view = (key_cache.transpose(1, 2), value_cache.transpose(1, 2)) if head_major \
                        else (key_cache, value_cache)
                    function = lambda launch=launch, engine_view=engine_view: paged_decode_attention(  # noqa: E731
                        query, *engine_view, tables, lengths, context, scale, num_splits=1, launch=launch)
                try:
                    output = function()
                    milliseconds = graph_ms(function)
                except Exception as error:  # e.g. out of shared memory
                    print(f"{name}: block {block_size:3d} {'head' if head_major else 'token'}-major {kernel} {launch}: "
                          f"{type(error).__name__}: {str(error)[:120]}", flush=True)
                    continue
                if reference is None:
                    reference = output.float()
                row = dict(shape=name, block_size=block_size, head_major=head_major, kernel=kernel, launch=launch,
                           us=milliseconds * 1e3, tbps=kv_bytes / milliseconds / 1e9,
                           max_diff=(output.float() - reference).abs().max().item())
                results.append(row)
                print(f"{name}: block {block_size:3d} {'head' if head_major else 'token'}-major {kernel:13s} "
                      f"{str(launch):70s} {row['us']:7.1f} us {row['tbps']:5.2f} TB/s max|diff| {row['max_diff']:.4f}",
                      flush=True)
            del key_cache, value_cache
            torch.cuda.empty_cache()
        best = min((row for row in results if row["shape"] == name), key=lambda row: row["us"])
        print(f"best {name}: {best['us']:.1f} us ({best['tbps']:.2f} TB/s) block {best['block_size']} "
              f"{'head' if best['head_major'] else 'token'}-major {best['kernel']} {best['launch']}", flush=True)
    if len(sys.argv) > 1:
        write_json(sys.argv[1], results, indent=1)


if __name__ == "__main__":
    main()
