"""Decode-attention launch configs, bf16 vs fp8 KV cache, graph-timed (one GPU call, ~1 minute).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/decode_sweep.py [--focus | --splits | --w3] [out.json]
(``--focus``: only workload 2's step shape, compact and spread caches: bf16 and fp8 with each launch variant, the
grid order (heads first, the default since 2026-12-06 (k), against sequences first) and a head-major cache layout.
``--splits``: Qwen3-0.6B's layer at the batch sizes workload 2 passes through as its requests finish (16-256 rows,
1-2k tokens), every split count 1-8 against ``choose_num_splits``'s choice.
``--w3``: workload 3's decode step (Llama-3.2-1B layer, 256 sequences x 576 tokens, the cache spread 20x as an
engine's): the grid order, the head-major layout and every tile / warps / stages setting against the default.)

Shapes of workload 2 (Qwen3-0.6B: 16 query / 8 KV heads of 128) and of Llama-3.2-1B (32 / 8 of 64),
block size 16, shuffled block tables. For every (cache dtype, block_n, num_warps, num_stages) it prints
the time of one layer's decode attention and the KV bytes read per second, so the fp8 cache's
launch settings can be chosen from measurements instead of end-to-end runs that move ~10 % between calls.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import capture_graph  # noqa: E402

from joule.kernels.paged_decode import MIN_SPLIT_TOKENS, choose_num_splits, paged_decode_attention  # noqa: E402
from joule.perf.json_files import write_json  # noqa: E402

DEVICE = torch.device("cuda")


def graph_ms(function, calls: int = 20, repeats: int = 10) -> float:
    """Median milliseconds per call from a CUDA graph of ``calls`` calls."""
    graph = capture_graph(lambda: [function() for _ in range(calls)])
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def make_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int, cache_dtype, seed: int = 0,
                spread: int = 1, head_major: bool = False):
    """``spread`` > 1: a cache that many times larger than the blocks read, the used ones scattered over it
    (an engine's cache spans ~100 GB: page-table reach may matter where a compact test cache hides it).
    ``head_major``: blocks stored head by head (``KVCache.allocate(head_major=True)``), same logical shape."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the same cache and query contents in every layout, so outputs compare
    block_size = 16
    blocks_per_sequence = -(-context // block_size)
    num_blocks = batch * blocks_per_sequence * spread + 1
    permutation = torch.randperm(num_blocks - 1, generator=generator) + 1
    tables = permutation[: batch * blocks_per_sequence].view(batch, blocks_per_sequence).to(torch.int32)
    if head_major:
        keys, values = (torch.empty((num_blocks, kv_heads, block_size, head_dim), device=DEVICE,
                                    dtype=cache_dtype).transpose(1, 2) for _ in range(2))
    else:
        shape = (num_blocks, block_size, kv_heads, head_dim)
        keys = torch.empty(shape, device=DEVICE, dtype=cache_dtype)
        values = torch.empty(shape, device=DEVICE, dtype=cache_dtype)
    for cache in (keys, values):  # in slices: a bf16 copy of a spread cache would not fit
        for start in range(0, num_blocks, 4096):
            cache[start:start + 4096] = torch.randn(cache[start:start + 4096].shape, device=DEVICE).to(cache_dtype)
    query = torch.randn(batch, heads, head_dim, device=DEVICE, dtype=torch.bfloat16)
    lengths = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    return query, keys, values, tables.to(DEVICE), lengths


def focus() -> list[dict]:
    """Workload 2's decode step shape (Qwen3-0.6B layer, 256 sequences x 1k context) with the default launch:
    bf16 vs fp8 vs fp8 with fp16 dots, on a compact cache and on one spread 40x (as an engine's)."""
    rows = []
    variants = ((torch.bfloat16, {}, False), (torch.bfloat16, {"heads_first": False}, False),
                (torch.bfloat16, {}, True), (torch.float8_e4m3fn, {"fp8_asm": False}, False),
                (torch.float8_e4m3fn, {"fp8_asm": False, "fp16_dot": True}, False), (torch.float8_e4m3fn, {}, False),
                (torch.float8_e4m3fn, {"heads_first": False}, False), (torch.float8_e4m3fn, {}, True))
    for spread in (1, 40):
        for cache_dtype, launch, head_major in variants:
            query, keys, values, tables, lengths = make_inputs(256, 1024, 16, 8, 128, cache_dtype, spread=spread,
                                                               head_major=head_major)
            kv_bytes = 2 * 256 * 1024 * 8 * 128 * keys.element_size()
            output = torch.empty_like(query)
            milliseconds = graph_ms(lambda: paged_decode_attention(
                query, keys, values, tables, lengths, 1024, 128**-0.5, num_splits=1, output=output, launch=launch))
            row = dict(spread=spread, cache=str(cache_dtype), launch=launch, head_major=head_major,
                       us=milliseconds * 1e3,
                       gbps=kv_bytes / milliseconds / 1e6, cache_gb=2 * keys.numel() * keys.element_size() / 1e9)
            rows.append(row)
            print(f"focus: spread {spread:2d} ({row['cache_gb']:.1f} GB) {str(cache_dtype):20s} {str(launch):40s}"
                  f" {'head-major' if head_major else 'token-major'}"
                  f" {row['us']:7.1f} us  {row['gbps']:6.0f} GB/s", flush=True)
            del query, keys, values
            torch.cuda.empty_cache()
    return rows


def split_sweep() -> list[dict]:
    """Each (batch, context) of Qwen3-0.6B's layer at 1-8 splits; the rule's pick beside the best."""
    rows = []
    processors = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    for batch, context in itertools.product((16, 24, 40, 50, 64, 100, 120, 160, 256), (1024, 2048)):
        query, keys, values, tables, lengths = make_inputs(batch, context, 16, 8, 128, torch.bfloat16)
        kv_bytes = 2 * batch * context * 8 * 128 * keys.element_size()
        output = torch.empty_like(query)
        times = {}
        for splits in range(1, 9):
            times[splits] = 1e3 * graph_ms(lambda splits=splits: paged_decode_attention(
                query, keys, values, tables, lengths, context, 128**-0.5, num_splits=splits, output=output,
                min_split_tokens=MIN_SPLIT_TOKENS))
        current = choose_num_splits(batch, 8, context, processors)
        best = min(times, key=times.get)
        row = dict(batch=batch, context=context, us=times, best=best, current=current,
                   gbps_best=kv_bytes / times[best] / 1e3)
        rows.append(row)
        nan = float("nan")  # the rule's pick beyond the eight counts timed
        print(f"splits: B={batch:3d} ctx={context:4d}  best {best} {times[best]:7.1f} us ({row['gbps_best']:5.0f} GB/s)"
              f"  current {current} {times.get(current, nan):7.1f}  "
              + " ".join(f"{s}:{t:.0f}" for s, t in times.items()), flush=True)
        del query, keys, values
        torch.cuda.empty_cache()
    return rows


def workload_three() -> list[dict]:
    """Llama-3.2-1B's decode attention at workload 3's decode steps: which launch reads its KV fastest."""
    rows = []
    batch, context = 256, 576
    variants = [({}, False), ({"heads_first": False}, False), ({}, True), ({"heads_first": False}, True)]
    variants += [({"splits": splits}, False) for splits in (2, 3, 4)]  # shorter programs: more, fuller waves
    variants += [(dict(block_n=block_n, num_warps=warps, num_stages=stages), False)
                 for block_n, warps, stages in itertools.product((64, 128, 256), (4, 8), (2, 3, 4))]
    reference = None
    for launch, head_major in variants:
        query, keys, values, tables, lengths = make_inputs(batch, context, 32, 8, 64, torch.bfloat16, spread=20,
                                                           head_major=head_major)
        kv_bytes = 2 * batch * context * 8 * 64 * keys.element_size()
        output = torch.empty_like(query)
        kernel_launch = {key: value for key, value in launch.items() if key != "splits"}
        try:
            milliseconds = graph_ms(lambda: paged_decode_attention(
                query, keys, values, tables, lengths, context, 64**-0.5, num_splits=launch.get("splits", 1),
                output=output, launch=kernel_launch, min_split_tokens=MIN_SPLIT_TOKENS))
        except Exception as error:  # e.g. out of shared memory
            print(f"w3: {launch} head_major={head_major}: {type(error).__name__}", flush=True)
            continue
        if reference is None:
            reference = output.float().clone()
        row = dict(launch=launch, head_major=head_major, us=milliseconds * 1e3, gbps=kv_bytes / milliseconds / 1e6,
                   max_diff=(output.float() - reference).abs().max().item())
        rows.append(row)
        print(f"w3: {str(launch):55s} {'head-major' if head_major else 'token-major'} {row['us']:7.1f} us  "
              f"{row['gbps']:6.0f} GB/s  max|diff| {row['max_diff']:.4f}", flush=True)
        del query, keys, values
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    for flag, sweep in (("--splits", split_sweep), ("--focus", focus), ("--w3", workload_three)):
        if flag in sys.argv:
            rows = sweep()
            out = [arg for arg in sys.argv[1:] if arg != flag]
            if out:
                with open(out[0], "w") as handle:
                    json.dump(rows, handle, indent=1)
            return
    results = []
    shapes = (("qwen3-0.6b", 16, 8, 128), ("llama-3.2-1b", 32, 8, 64))
    for (name, heads, kv_heads, head_dim), (batch, context) in itertools.product(shapes, ((256, 1024), (64, 4096))):
        for cache_dtype in (torch.bfloat16, torch.float8_e4m3fn):
            reference = None  # the first config's output: every other config must agree with it
            query, keys, values, tables, lengths = make_inputs(batch, context, heads, kv_heads, head_dim, cache_dtype)
            kv_bytes = 2 * batch * context * kv_heads * head_dim * keys.element_size()
            line = []
            for block_n, warps, stages in itertools.product((32, 64, 128), (4, 8), (2, 3, 4)):
                launch = dict(block_n=block_n, num_warps=warps, num_stages=stages)
                try:
                    output = torch.empty_like(query)
                    milliseconds = graph_ms(lambda: paged_decode_attention(
                        query, keys, values, tables, lengths, context, head_dim**-0.5, num_splits=1,
                        output=output, launch=launch))
                except Exception as error:  # e.g. out of shared memory
                    line.append((float("inf"), launch, type(error).__name__))
                    continue
                if reference is None:
                    reference = output.float().clone()
                error = (output.float() - reference).abs().max().item()
                line.append((milliseconds, launch, f"{kv_bytes / milliseconds / 1e6:.0f} GB/s, max|diff| {error:.3f}"))
                results.append(dict(model=name, batch=batch, context=context, cache=str(cache_dtype), **launch,
                                    ms=milliseconds, gbps=kv_bytes / milliseconds / 1e6, max_diff=error))
            line.sort(key=lambda item: item[0])
            default = next((item for item in line if item[1] == dict(
                block_n=128 if head_dim <= 64 else 64, num_warps=4, num_stages=2)), None)
            print(f"{name} B={batch} ctx={context} {cache_dtype}: default {default[0] * 1e3:.1f}us ({default[2]})"
                  if default else f"{name} B={batch} ctx={context} {cache_dtype}: default failed", flush=True)
            for milliseconds, launch, note in line[:4]:
                print(f"    {milliseconds * 1e3:8.1f}us  {launch}  {note}", flush=True)
            del query, keys, values
            torch.cuda.empty_cache()
    if len(sys.argv) > 1:
        write_json(sys.argv[1], results, indent=1)


if __name__ == "__main__":
    main()
