"""The decode step's GEMMs at batch sizes 1-512, cuBLAS with the weight as the engine stores it ([out, in], x @ W.T)
and transposed ([in, out], x @ W), graph-timed: where a 256-row step's projections lose time to their tiles.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/decode_gemm_sweep.py [out.json]
Why: the 2026-12-05 (e) profile of workload 3's decode steps (H100, 256 rows) put q/k/v, o and down at ~10-17 and
~9 us where their weight bytes or FLOPs allow ~4-11 and ~3 (docs/benchmarks.md); this sweep measures them alone,
without the profiler, beside the layout cuBLAS may serve better. Prints us a call, the weight bytes' rate and
TFLOP/s, Llama-3.2-1B and Qwen3-0.6B shapes, bf16; the raw rows go to the JSON.
"""

from __future__ import annotations

import json
import sys

import torch

# (model, projection, out features, in features)
SHAPES = [
    ("llama-3.2-1b", "qkv", 3072, 2048), ("llama-3.2-1b", "o", 2048, 2048), ("llama-3.2-1b", "gate_up", 16384, 2048),
    ("llama-3.2-1b", "down", 2048, 8192), ("llama-3.2-1b", "lm_head", 128256, 2048),
    ("qwen3-0.6b", "qkv", 4096, 1024), ("qwen3-0.6b", "o", 1024, 2048), ("qwen3-0.6b", "gate_up", 6144, 1024),
    ("qwen3-0.6b", "down", 1024, 3072), ("qwen3-0.6b", "lm_head", 151936, 1024),
]
ROWS = [1, 16, 64, 128, 256, 512]
LAYOUTS = ("out_in", "in_out")


def products(rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: str):
    """The two layouts' calls on the same random input and weight (never zeros), and their results."""
    generator = torch.Generator(device="cpu").manual_seed(rows + out_features)
    hidden = torch.randn(rows, in_features, generator=generator).to(device, dtype)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features ** 0.5).to(device, dtype)
    transposed = weight.t().contiguous()
    calls = {"out_in": lambda: torch.nn.functional.linear(hidden, weight), "in_out": lambda: hidden @ transposed}
    return calls, {name: call() for name, call in calls.items()}


def graph_us(function, calls: int = 20, repeats: int = 7) -> float:
    """Median microseconds a call, from a CUDA graph of ``calls`` calls (no launch gaps, no profiler)."""
    function()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(1e3 * start.elapsed_time(end) / calls)
    return sorted(times)[len(times) // 2]


def main(out_path: str) -> None:
    rows_out = []
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16")
    print(f"{'model':<13} {'proj':<8} {'rows':>5} {'[out,in] us':>12} {'TB/s':>6} {'TFLOP/s':>8} "
          f"{'[in,out] us':>12} {'TB/s':>6} {'TFLOP/s':>8}")
    for model, projection, out_features, in_features in SHAPES:
        for rows in ROWS:
            calls, results = products(rows, out_features, in_features, torch.bfloat16, "cuda")
            difference = (results["out_in"].float() - results["in_out"].float()).abs().max().item()
            row = {"model": model, "projection": projection, "rows": rows, "out": out_features, "in": in_features,
                   "max_difference": difference}
            cells = []
            for layout in LAYOUTS:
                micros = graph_us(calls[layout])
                bytes_rate = 2 * out_features * in_features / micros / 1e6  # TB/s of weight reads
                flops = 2 * rows * out_features * in_features / micros / 1e6  # TFLOP/s
                row[layout] = {"us": micros, "weight_tb_per_s": bytes_rate, "tflop_per_s": flops}
                cells.append(f"{micros:>12.2f} {bytes_rate:>6.2f} {flops:>8.1f}")
            rows_out.append(row)
            print(f"{model:<13} {projection:<8} {rows:>5} {cells[0]} {cells[1]}", flush=True)
    with open(out_path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "rows": rows_out}, file)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "decode_gemm_sweep.json")
