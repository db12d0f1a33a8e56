"""The MLP's gate/up projection with SiLU-and-mul in its epilogue (one Triton GEMM) against cuBLAS + our
silu_and_mul kernel, at prompt-step and decode-step row counts, graph-timed: whether the fusion pays.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/gate_up_silu_sweep.py [out.json]
Why: in workload 3 on the H100 (docs/benchmarks.md, 2026-12-05 (f)) a prompt step's layer spends 792.7 us in
cuBLAS's gate/up GEMM (~690 TFLOP/s) and then 137 us in SiLU-and-mul, which reads the GEMM's [T, 2I] output back
and writes [T, I] (~4 % of the run). A GEMM that keeps both halves' accumulators and writes only
``silu(gate) * up`` saves that pass and half the GEMM's output writes, if it runs near cuBLAS's speed. The kernel
is ``joule/kernels/gate_up_silu.py`` (the engine runs it with ``JOULE_FUSED_GATE_UP=1``, off until this sweep
and an end-to-end A/B say it pays); each row here lists the best of ``TILES``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton

from joule.kernels.gate_up_silu import gate_up_silu

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (model, intermediate size I, hidden size K)
SHAPES = [("llama-3.2-1b", 8192, 2048), ("qwen3-0.6b", 3072, 1024), ("llama-3.1-8b", 14336, 4096)]
ROWS = [256, 2048, 8192]
# (block_m, block_n, block_k, num_warps, num_stages, group_m)
TILES = [(128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 64, 64, 4, 4, 8), (64, 128, 64, 4, 4, 8),
         (128, 128, 32, 8, 5, 8), (64, 64, 64, 4, 4, 8), (64, 64, 128, 4, 3, 8), (256, 64, 64, 8, 3, 8)]


def unfused(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What the engine runs now: the merged projection (cuBLAS), then silu_and_mul."""
    from joule.kernels.activation import silu_and_mul

    return silu_and_mul(torch.nn.functional.linear(hidden, weight))


def inputs(rows: int, intermediate: int, hidden_size: int, dtype: torch.dtype, device: str):
    generator = torch.Generator(device="cpu").manual_seed(rows + intermediate)
    hidden = torch.randn(rows, hidden_size, generator=generator).to(device, dtype)
    weight = (torch.randn(2 * intermediate, hidden_size, generator=generator) / hidden_size ** 0.5).to(device, dtype)
    return hidden, weight


def main(out_path: str) -> None:
    from decode_sweep import graph_ms

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16")
    print(f"{'model':<13} {'rows':>5} {'cuBLAS+SiLU us':>15} {'TFLOP/s':>8} {'fused us':>9} {'TFLOP/s':>8} "
          f"{'best tile':>22} {'max diff':>9} {'cuBLAS GEMM us':>15}")
    results = []
    for model, intermediate, hidden_size in SHAPES:
        for rows in ROWS:
            hidden, weight = inputs(rows, intermediate, hidden_size, torch.bfloat16, "cuda")
            flops = 2 * rows * 2 * intermediate * hidden_size
            expected = unfused(hidden, weight)
            row = {"model": model, "rows": rows, "intermediate": intermediate, "hidden": hidden_size,
                   "unfused_us": 1e3 * graph_ms(lambda: unfused(hidden, weight)),
                   "gemm_only_us": 1e3 * graph_ms(lambda: torch.nn.functional.linear(hidden, weight)), "tiles": {}}
            for tile in TILES:
                try:
                    difference = (gate_up_silu(hidden, weight, tile).float() - expected.float()).abs().max().item()
                    micros = 1e3 * graph_ms(lambda tile=tile: gate_up_silu(hidden, weight, tile))
                except Exception as failure:  # noqa: BLE001 - a tile the compiler or the GPU rejects
                    print(f"  {model} {rows} {tile}: {failure!r}"[:200], flush=True)
                    continue
                row["tiles"]["x".join(map(str, tile))] = {"us": micros, "max_difference": difference}
            best = min(row["tiles"], key=lambda name: row["tiles"][name]["us"]) if row["tiles"] else None
            fused = row["tiles"][best] if best else {"us": float("nan"), "max_difference": float("nan")}
            print(f"{model:<13} {rows:>5} {row['unfused_us']:>15.1f} {flops / row['unfused_us'] / 1e6:>8.0f} "
                  f"{fused['us']:>9.1f} {flops / fused['us'] / 1e6:>8.0f} {best or '-':>22} "
                  f"{fused['max_difference']:>9.3g} {row['gemm_only_us']:>15.1f}", flush=True)
            results.append(row)
            torch.cuda.empty_cache()
    with open(out_path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "rows": results}, file)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "gate_up_silu_sweep.json")
