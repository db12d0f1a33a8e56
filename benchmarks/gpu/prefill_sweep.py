"""Prefill/extend attention's launch settings at the engine's prompt steps, graph-timed (one GPU call, ~1-2 minutes).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/prefill_sweep.py [out.json]

Why: workload 3's prompt steps (16 prompts x 512 new tokens, Llama-3.2-1B: 32 / 8 heads of 64) spend ~81 us a layer
in the prefill kernel (H100, 2026-12-06 (k), ``step_gaps.py w3``), ~210 TFLOP/s of causal attention, ~3 % of a run;
its launch (128-row tiles, 64-key tiles, 8 warps, 3 stages) was chosen on an H200 at one 8k prompt. This times every
(block_m, block_n, warps, stages) at that step, at workload 2's kind of step (Qwen3-0.6B: 16 / 8 heads of 128; prompts
of 100-1,024 tokens, some chunks after a context) and at the 8k prompt, each output checked against the default's.
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from check_kernels import DEVICE, make_batch  # noqa: E402
from decode_sweep import graph_ms  # noqa: E402

from joule.kernels.paged_prefill import build_tiles, paged_prefill_attention, prefill_config  # noqa: E402
from joule.perf.json_files import write_json  # noqa: E402

# (name, heads, kv heads, head dim, (context, new tokens) per sequence)
STEPS = (
    ("w3 prompt step", 32, 8, 64, [(0, 512)] * 16),
    ("w2-like prompt step", 16, 8, 128, [(0, 900), (0, 300), (0, 700), (0, 1024), (512, 400), (0, 150), (0, 1000),
                                         (0, 600), (0, 850), (300, 724), (0, 480), (0, 864)]),
    ("one 8k prompt", 32, 8, 64, [(0, 8192)]),
)
LAUNCHES = [dict(block_m=m, block_n=n, num_warps=w, num_stages=s)
            for m, n, w, s in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3, 4))]


def wall_ms(function) -> float:
    """One call's wall milliseconds: the CPU test's stand-in for graph timing."""
    started = time.perf_counter()
    function()
    return 1e3 * (time.perf_counter() - started)


def causal_flops(steps, heads: int, head_dim: int) -> float:
    """Multiply-adds x 2 of QK^T and PV over each new row's keys (its context and the new rows up to it)."""
    keys = sum(new * context + new * (new + 1) / 2 for context, new in steps)
    return 4 * keys * heads * head_dim


def main() -> None:
    results = []
    for name, heads, kv_heads, head_dim, steps in STEPS:
        batch = make_batch(steps, heads, kv_heads, head_dim, 16, torch.bfloat16, seed=7)
        cache, metadata = batch["cache"], batch["metadata"]
        lengths = torch.tensor(metadata.sequence_lengths, dtype=torch.int32, device=DEVICE)
        flops = causal_flops(steps, heads, head_dim)
        default = prefill_config(heads // kv_heads, head_dim, torch.bfloat16)
        reference = None
        timed = []
        group = heads // kv_heads
        for launch in [default] + [launch for launch in LAUNCHES if launch != default]:
            # The tiles are built before the graph (as the engine's backend builds them a step): a graph replays
            # no host work, and the copy of a freed pinned buffer would replay garbage.
            tiles = build_tiles(metadata.query_lengths, metadata.sequence_lengths, launch["block_m"] // group, DEVICE)

            def run(launch=launch, tiles=tiles, batch=batch, cache=cache):
                return paged_prefill_attention(
                    batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
                    metadata.query_start_locations, lengths, head_dim**-0.5, tiles=tiles,
                    launch={**launch, "tile_rows": launch["block_m"] // group})
            try:
                output = run().float()
                milliseconds = graph_ms(run) if DEVICE.type == "cuda" else wall_ms(run)
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory
                print(f"{name}: {launch}: {type(error).__name__}", flush=True)
                continue
            reference = output if reference is None else reference
            row = dict(step=name, **launch, us=1e3 * milliseconds, tflops=flops / milliseconds / 1e9,
                       max_diff=(output - reference).abs().max().item(), default=launch == default)
            results.append(row)
            timed.append(row)
        timed.sort(key=lambda row: row["us"])
        base = next(row for row in timed if row["default"])
        print(f"{name}: default {base['us']:.1f} us ({base['tflops']:.0f} TFLOP/s)", flush=True)
        for row in timed[:5]:
            print(f"    {row['us']:7.1f} us {row['tflops']:5.0f} TFLOP/s  block_m {row['block_m']:3d} block_n "
                  f"{row['block_n']:3d} warps {row['num_warps']} stages {row['num_stages']}  "
                  f"{100 * (row['us'] / base['us'] - 1):+5.1f} %  max|diff| {row['max_diff']:.4f}", flush=True)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    if len(sys.argv) > 1:
        write_json(sys.argv[1], results, indent=1)


if __name__ == "__main__":
    main()
