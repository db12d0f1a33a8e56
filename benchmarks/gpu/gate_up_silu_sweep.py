"""The MLP's gate/up projection with SiLU-and-mul in its epilogue (one Triton GEMM) against cuBLAS + our
silu_and_mul kernel, at prompt-step and decode-step row counts, graph-timed: whether the fusion pays.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/gate_up_silu_sweep.py [out.json]
Why: in workload 3 on the H100 (docs/benchmarks.md, 2026-12-05 (f)) a prompt step's layer spends 792.7 us in
cuBLAS's gate/up GEMM (~690 TFLOP/s) and then 137 us in SiLU-and-mul, which reads the GEMM's [T, 2I] output back
and writes [T, I] (~4 % of the run). A GEMM that keeps both halves' accumulators and writes only
``silu(gate) * up`` saves that pass and half the GEMM's output writes, if it runs near cuBLAS's speed. The kernel
lives here until it wins (then it moves to joule/kernels with the engine's MLP calling it).
Each program computes one [BLOCK_M, BLOCK_N] tile of the output from the gate rows ``n`` and the up rows
``I + n`` of the merged [2I, K] weight (the engine's layout), two accumulators in float32; the projections are
rounded to the activation dtype before the SiLU, as the unfused path rounds them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))

# (model, intermediate size I, hidden size K)
SHAPES = [("llama-3.2-1b", 8192, 2048), ("qwen3-0.6b", 3072, 1024), ("llama-3.1-8b", 14336, 4096)]
ROWS = [256, 2048, 8192]
# (block_m, block_n, block_k, num_warps, num_stages, group_m)
TILES = [(128, 128, 64, 8, 3, 8), (128, 128, 64, 8, 4, 8), (128, 64, 64, 4, 4, 8), (64, 128, 64, 4, 4, 8),
         (128, 128, 32, 8, 5, 8), (64, 64, 64, 4, 4, 8), (64, 64, 128, 4, 3, 8), (256, 64, 64, 8, 3, 8)]


@triton.jit
def _gate_up_silu_kernel(x_ptr, weight_ptr, out_ptr, rows, intermediate, hidden, stride_x, stride_weight,
                         stride_out, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr):
    """One output tile of ``silu(x @ W[:I].T) * (x @ W[I:].T)``; programs walk GROUP_M row blocks per column
    block so neighbours share weight tiles in L2."""
    program = tl.program_id(0)
    row_blocks = tl.cdiv(rows, BLOCK_M)
    column_blocks = tl.cdiv(intermediate, BLOCK_N)
    per_group = GROUP_M * column_blocks
    first_row_block = (program // per_group) * GROUP_M
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_M)
    row_block = first_row_block + (program % per_group) % group_rows
    column_block = (program % per_group) // group_rows
    row_offsets = row_block * BLOCK_M + tl.arange(0, BLOCK_M)
    column_offsets = column_block * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, column_mask = row_offsets < rows, column_offsets < intermediate
    inner = tl.arange(0, BLOCK_K)
    # 32-bit offsets (every operand here is under 2**31 elements) advanced in place: 64-bit pointer tiles
    # rebuilt each step spilled registers at every tile (ptxas, sm_90).
    x_pointers = x_ptr + row_offsets[:, None] * stride_x + inner[None, :]
    gate_pointers = weight_ptr + column_offsets[None, :] * stride_weight + inner[:, None]
    up_pointers = gate_pointers + intermediate * stride_weight
    gate_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, hidden, BLOCK_K):
        inner_mask = start + inner < hidden
        x = tl.load(x_pointers, mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        weight_mask = inner_mask[:, None] & column_mask[None, :]
        gate = tl.load(gate_pointers, mask=weight_mask, other=0.0)
        up = tl.load(up_pointers, mask=weight_mask, other=0.0)
        gate_sum = tl.dot(x, gate, gate_sum)
        up_sum = tl.dot(x, up, up_sum)
        x_pointers += BLOCK_K
        gate_pointers += BLOCK_K
        up_pointers += BLOCK_K
    element = out_ptr.dtype.element_ty
    gate_value = gate_sum.to(element).to(tl.float32)
    up_value = up_sum.to(element).to(tl.float32)
    activated = gate_value / (1.0 + tl.exp(-gate_value)) * up_value
    tl.store(out_ptr + row_offsets[:, None] * stride_out + column_offsets[None, :], activated.to(element),
             mask=row_mask[:, None] & column_mask[None, :])


def gate_up_silu(hidden: torch.Tensor, weight: torch.Tensor, tile: tuple[int, int, int, int, int, int]) -> torch.Tensor:
    """``silu(hidden @ weight[:I].T) * (hidden @ weight[I:].T)`` for a merged ``[2I, K]`` weight."""
    block_m, block_n, block_k, num_warps, num_stages, group_m = tile
    rows, hidden_size = hidden.shape
    if weight.shape[1] != hidden_size or weight.shape[0] % 2 or weight.stride(1) != 1 or hidden.stride(1) != 1:
        raise ValueError(f"gate_up_silu: weight {tuple(weight.shape)} must be [2I, {hidden_size}], rows contiguous")
    intermediate = weight.shape[0] // 2
    out = torch.empty((rows, intermediate), dtype=hidden.dtype, device=hidden.device)
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(intermediate, block_n),)
    _gate_up_silu_kernel[grid](hidden, weight, out, rows, intermediate, hidden_size, hidden.stride(0),
                               weight.stride(0), out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                               GROUP_M=group_m, num_warps=num_warps, num_stages=num_stages)
    return out


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
