"""The decode step's GEMMs at batch sizes 1-512, cuBLAS with the weight as the engine stores it ([out, in], x @ W.T)
and transposed ([in, out], x @ W), and a plain Triton GEMM over a few tile shapes (the best one per row listed),
graph-timed: where a 256-row step's projections lose time to their tiles, and whether a kernel of our own would win
them back (it lives here until it does).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/decode_gemm_sweep.py [out.json]
Why: the 2026-12-05 (e) profile of workload 3's decode steps (H100, 256 rows) put q/k/v, o and down at ~10-17 and
~9 us where their weight bytes or FLOPs allow ~4-11 and ~3 (docs/benchmarks.md); this sweep measures them alone,
without the profiler, beside the layout cuBLAS may serve better. Prints us a call, the weight bytes' rate and
TFLOP/s, Llama-3.2-1B and Qwen3-0.6B shapes, bf16; the raw rows go to the JSON. Its first run (2026-12-05 (f))
called one weight 20 times, so weights under 50 MB came from L2; each call now takes the next of several copies
(``ROTATE_BYTES``), and split-K tiles (``SPLIT_TILES``) are tried beside the plain ones; cuBLASLt's choice
(``out_in_lt``) stands beside cuBLAS's, and 8,192 rows (a prompt step) beside the decode sizes.
"""

from __future__ import annotations

import itertools
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
ROWS = [1, 16, 64, 128, 256, 512, 8192]  # 8192: a prompt step of workload 3 (not for lm_head: prompts sample one row)
LAYOUTS = ("out_in", "in_out", "out_in_lt")
# (block_m, block_n, block_k, num_warps, num_stages) of the Triton GEMM tried at each shape.
TRITON_TILES = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 128, 64, 8, 3),
                (64, 32, 128, 4, 4), (32, 64, 128, 4, 4)]
# Split-K variants (a sixth entry: inner-dimension splits, summed by float32 atomics, then cast): at 256 rows
# cuBLAS runs down (K = 8192) on 128 64x64 tiles, each walking all of K (20 us in workload 3's decode steps
# against ~12 us of FLOPs, docs/benchmarks.md (f)).
SPLIT_TILES = [(128, 128, 64, 8, 3, 4), (128, 64, 64, 4, 4, 4), (64, 128, 64, 4, 4, 2), (64, 64, 64, 4, 4, 4)]
# Weights smaller than this are timed over several copies called in turn, so each call reads its weight from
# DRAM as the engine does (the H100's L2 is 50 MB; a weight called 20 times in a row would stay there).
ROTATE_BYTES = 160 << 20


@triton.jit
def _gemm_kernel(x_ptr, weight_ptr, out_ptr, rows, out_features, in_features, stride_x, stride_weight, stride_out,
                 split_length, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 ATOMIC: tl.constexpr):
    """``x @ weight.T`` for one [BLOCK_M, BLOCK_N] tile over one ``split_length`` range of the inner dimension
    (program id 2; with ATOMIC the ranges' sums are added into a float32 ``out``); the row blocks of a weight
    tile are neighbours in the grid (program id 0), so they run together and read that tile from L2."""
    row_offsets = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    column_offsets = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask, column_mask = row_offsets < rows, column_offsets < out_features
    accumulator = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    first = tl.program_id(2) * split_length
    for start in range(first, tl.minimum(first + split_length, in_features), BLOCK_K):
        inner = start + tl.arange(0, BLOCK_K)
        inner_mask = inner < in_features
        x = tl.load(x_ptr + row_offsets[:, None].to(tl.int64) * stride_x + inner[None, :],
                    mask=row_mask[:, None] & inner_mask[None, :], other=0.0)
        weight = tl.load(weight_ptr + column_offsets[:, None].to(tl.int64) * stride_weight + inner[None, :],
                         mask=column_mask[:, None] & inner_mask[None, :], other=0.0)
        accumulator = tl.dot(x, tl.trans(weight), accumulator)
    pointers = out_ptr + row_offsets[:, None].to(tl.int64) * stride_out + column_offsets[None, :]
    mask = row_mask[:, None] & column_mask[None, :]
    if ATOMIC:
        tl.atomic_add(pointers, accumulator, mask=mask)
    else:
        tl.store(pointers, accumulator.to(out_ptr.dtype.element_ty), mask=mask)


def triton_gemm(hidden: torch.Tensor, weight: torch.Tensor, tile: tuple[int, ...],
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``hidden [M, K] @ weight [N, K].T`` with one of ``TRITON_TILES`` or ``SPLIT_TILES`` (split-K: a zeroed
    float32 sum, then a cast, both counted in the time)."""
    block_m, block_n, block_k, num_warps, num_stages = tile[:5]
    splits = tile[5] if len(tile) > 5 else 1
    rows, in_features = hidden.shape
    out_features = weight.shape[0]
    split_length = triton.cdiv(triton.cdiv(in_features, splits), block_k) * block_k
    target = out
    if splits > 1:
        target = torch.zeros((rows, out_features), dtype=torch.float32, device=hidden.device)
    elif target is None:
        target = torch.empty((rows, out_features), dtype=hidden.dtype, device=hidden.device)
    grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n), triton.cdiv(in_features, split_length))
    _gemm_kernel[grid](hidden, weight, target, rows, out_features, in_features, hidden.stride(0), weight.stride(0),
                       target.stride(0), split_length, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                       ATOMIC=splits > 1, num_warps=num_warps, num_stages=num_stages)
    if splits == 1:
        return target
    if out is None:
        return target.to(hidden.dtype)
    return out.copy_(target)


def products(rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: str, copies: int = 1):
    """The two layouts' calls on the same random input and weight (never zeros), and their results. With
    ``copies`` > 1 each call takes the next of that many copies of the weight (each layout its own)."""
    generator = torch.Generator(device="cpu").manual_seed(rows + out_features)
    hidden = torch.randn(rows, in_features, generator=generator).to(device, dtype)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5).to(device, dtype)
    weights = [weight] + [weight.clone() for _ in range(copies - 1)]
    transposed = [copy.t().contiguous() for copy in weights]

    def rotating(call, pool):
        turn = itertools.count()
        return lambda: call(pool[next(turn) % len(pool)])

    calls = {"out_in": rotating(lambda w: torch.nn.functional.linear(hidden, w), weights),
             "in_out": rotating(lambda w: hidden @ w, transposed),
             "out_in_lt": rotating(lambda w: lt_linear(hidden, w), weights)}
    if 16 <= rows <= 512:  # tl.dot's smallest tile; a single row is the GEMV's
        for tile in TRITON_TILES + SPLIT_TILES:
            calls["triton " + "x".join(map(str, tile))] = rotating(
                lambda w, tile=tile: triton_gemm(hidden, w, tile), weights)
    return calls, {name: call() for name, call in calls.items()}


def lt_linear(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear`` through cuBLASLt (``TORCH_BLAS_PREFER_CUBLASLT=1`` for the whole process): its heuristics may
    pick other tiles (split-K among them) than cuBLAS's for the decode step's 256 rows. Plain ``F.linear`` off CUDA
    (the CPU tests)."""
    if not hidden.is_cuda:
        return torch.nn.functional.linear(hidden, weight)
    previous = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return torch.nn.functional.linear(hidden, weight)
    finally:
        torch.backends.cuda.preferred_blas_library(previous)


def graph_us(function) -> float:
    """Median microseconds a call, from a CUDA graph of 20 calls (no launch gaps, no profiler)."""
    return 1e3 * graph_ms(function)


def main(out_path: str) -> None:
    rows_out = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'model':<13} {'proj':<8} {'rows':>5} {'[out,in] us':>12} {'TB/s':>6} {'TFLOP/s':>8} "
          f"{'[in,out] us':>12} {'TB/s':>6} {'TFLOP/s':>8} {'Lt us':>12} {'TB/s':>6} {'TFLOP/s':>8} "
          f"{'triton us':>10} {'tile':>16} {'max diff':>9}")
    for model, projection, out_features, in_features in SHAPES:
        for rows in ROWS:
            if rows > 512 and projection == "lm_head":
                continue
            copies = max(1, -(-ROTATE_BYTES // (2 * out_features * in_features)))
            calls, results = products(rows, out_features, in_features, torch.bfloat16, "cuda", copies)
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
            print(f"{model:<13} {projection:<8} {rows:>5} {cells[0]} {cells[1]} {cells[2]} {triton_cell} "
                  f"{difference:>9.3g}",
                  flush=True)
    with open(out_path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, file)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "decode_gemm_sweep.json")
