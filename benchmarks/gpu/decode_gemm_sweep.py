"""The decode step's GEMMs at batch sizes 1-512, cuBLAS with the weight as the engine stores it ([out, in], x @ W.T)
and transposed ([in, out], x @ W), and a plain Triton GEMM over a few tile shapes (the best one per row listed),
graph-timed: where a 256-row step's projections lose time to their tiles, and whether a kernel of our own would win
them back (it lives here until it does).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/decode_gemm_sweep.py [out.json]
Why: the 2026-12-05 (e) profile of workload 3's decode steps (H100, 256 rows) put q/k/v, o and down at ~10-17 and
~9 us where their weight bytes or FLOPs allow ~4-11 and ~3 (docs/benchmarks.md); this sweep measures them alone,
without the profiler, beside the layout cuBLAS may serve better. Prints us a call, the weight bytes' rate and
TFLOP/s, Llama-3.2-1B and Qwen3-0.6B shapes, bf16; the raw rows go to the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import graph_ms  # noqa: E402

# (model, projection, out features, in features)
SHAPES = [
    ("llama-3.2-1b", "qkv", 3072, 2048), ("llama-3.2-1b", "o", 2048, 2048), ("llama-3.2-1b", "gate_up", 16384, 2048),
    ("llama-3.2-1b", "down", 2048, 8192), ("llama-3.2-1b", "lm_head", 128256, 2048),
    ("qwen3-0.6b", "qkv", 4096, 1024), ("qwen3-0.6b", "o", 1024, 2048), ("qwen3-0.6b", "gate_up", 6144, 1024),
    ("qwen3-0.6b", "down", 1024, 3072), ("qwen3-0.6b", "lm_head", 151936, 1024),
]
ROWS = [1, 16, 64, 128, 256, 512]
LAYOUTS = ("out_in", "in_out")
# (block_m, block_n, block_k, num_warps, num_stages) of the Triton GEMM tried at each shape.
TRITON_TILES = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
                (64, 32, 128, 4, 4), (32, 64, 128, 4, 4)]


@triton.jit
def _gemm_kernel(x_ptr, weight_ptr, out_ptr, rows, out_features, in_features, stride_x, stride_weight, stride_out,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``x @ weight.T`` for one [BLOCK_M, BLOCK_N] tile; the row blocks of a weight tile are neighbours in the grid
    (program id 0), so they run together and read that tile from L2."""
    row_offsets = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    column_offsets = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, column_mask = row_offsets < rows, column_offsets < out_features
    accumulator = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(0, in_features, BLOCK_K):
        inner = start + tl.arange(0, BLOCK_K)
        inner_mask = inner < in_features
        x = tl.load(x_ptr + row_offsets[:, None].to(tl.int64) * stride_x + inner[None, :],
                    mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        weight = tl.load(weight_ptr + column_offsets[:, None].to(tl.int64) * stride_weight + inner[None, :],
                         mask=column_mask[:, None] & inner_mask[None, :], other=0.0)
        accumulator = tl.dot(x, tl.trans(weight), accumulator)
    tl.store(out_ptr + row_offsets[:, None].to(tl.int64) * stride_out + column_offsets[None, :],
             accumulator.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & column_mask[None, :])


def triton_gemm(hidden: torch.Tensor, weight: torch.Tensor, tile: tuple[int, int, int, int, int],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden [M, K] @ weight [N, K].T`` with one of ``TRITON_TILES``."""
    block_m, block_n, block_k, num_warps, num_stages = tile
    rows, in_features = hidden.shape
    out_features = weight.shape[0]
    if out is None:
        out = torch.empty((rows, out_features), dtype=hidden.dtype, device=hidden.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
    _gemm_kernel[grid](hidden, weight, out, rows, out_features, in_features, hidden.stride(0), weight.stride(0),
                       out.stride(0), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=num_warps,
                       num_stages=num_stages)
    return out


def products(rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: str):
    """The two layouts' calls on the same random input and weight (never zeros), and their results."""
    generator = torch.Generator(device="cpu").manual_seed(rows + out_features)
    hidden = torch.randn(rows, in_features, generator=generator).to(device, dtype)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5).to(device, dtype)
    transposed = weight.t().contiguous()
    calls = {"out_in": lambda: torch.nn.functional.linear(hidden, weight), "in_out": lambda: hidden @ transposed}
    if rows >= 16:  # tl.dot's smallest tile; a single row is the GEMV's
        for tile in TRITON_TILES:
            calls["triton " + "x".join(map(str, tile))] = lambda tile=tile: triton_gemm(hidden, weight, tile)
    return calls, {name: call() for name, call in calls.items()}


def graph_us(function) -> float:
    """Median microseconds a call, from a CUDA graph of 20 calls (no launch gaps, no profiler)."""
    return 1e3 * graph_ms(function)


def main(out_path: str) -> None:
    rows_out = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'model':<13} {'proj':<8} {'rows':>5} {'[out,in] us':>12} {'TB/s':>6} {'TFLOP/s':>8} "
          f"{'[in,out] us':>12} {'TB/s':>6} {'TFLOP/s':>8} {'triton us':>10} {'tile':>16} {'max diff':>9}")
    for model, projection, out_features, in_features in SHAPES:
        for rows in ROWS:
            calls, results = products(rows, out_features, in_features, torch.bfloat16, "cuda")
            difference = max((result.float() - results["out_in"].float()).abs().max().item()
                             for result in results.values())
            row = {"model": model, "projection": projection, "rows": rows, "out": out_features, "in": in_features,
                   "max_difference": difference}
            for name, call in calls.items():
                micros = graph_us(call)
                row[name] = {"us": micros, "weight_tb_per_s": 2 * out_features * in_features / micros / 1e6,
                             "tflop_per_s": 2 * rows * out_features * in_features / micros / 1e6}
            cells = [f"{row[layout]['us']:>12.2f} {row[layout]['weight_tb_per_s']:>6.2f} "
                     f"{row[layout]['tflop_per_s']:>8.1f}" for layout in LAYOUTS]
            tiles = {name: row[name]["us"] for name in calls if name.startswith("triton")}
            best = min(tiles, key=tiles.get) if tiles else None
            triton_cell = f"{tiles[best]:>10.2f} {best[7:]:>16}" if best else f"{'-':>10} {'-':>16}"
            rows_out.append(row)
            print(f"{model:<13} {projection:<8} {rows:>5} {cells[0]} {cells[1]} {triton_cell} {difference:>9.3g}",
                  flush=True)
    with open(out_path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, file)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "decode_gemm_sweep.json")
