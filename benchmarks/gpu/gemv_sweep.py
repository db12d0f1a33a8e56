"""Batch-1 linear layers: cuBLAS (``F.linear``) vs the Triton GEMV, against the copy bandwidth.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/gemv_sweep.py [out.json [narrow]]
Each shape is timed inside a CUDA graph that walks distinct weight copies (>= 1 GB, so nothing is served
from L2), for F.linear, the GEMV with ``gemv_config``'s blocks (with programmatic dependent launch off and on,
and 0-2 weight tiles prefetched before the wait), and a grid of other blocks. Prints one table.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

from joule.bench.latency import copy_bandwidth
from joule.kernels.gemv import GemvConfig, gemv, gemv_config
from joule.runtime.graph_timing import repeated_graph

SHAPES = {  # name: (out_features, in_features)
    "llama1b.qkv": (3072, 2048), "llama1b.o": (2048, 2048), "llama1b.gate_up": (16384, 2048),
    "llama1b.down": (2048, 8192), "llama1b.lm_head": (128256, 2048),
    "qwen0.6b.qkv": (4096, 1024), "llama8b.down": (4096, 14336),
}


def capture_graph(function) -> torch.cuda.CUDAGraph:
    """``function``'s launches in a CUDA graph, after one warm-up run on a side stream (Triton compiles there)."""
    return repeated_graph(function, 1)


def timed_graph(call, copies: int, repeats: int = 5) -> float:
    """Seconds per call: ``copies`` calls (one per weight copy) captured in one graph, best of ``repeats``."""
    graph = capture_graph(lambda: [call(index) for index in range(copies)])
    graph.replay()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3 / copies)
    return best


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else None
    # "narrow": only the Llama-3.2-1B projections under 24M weights, over deeper tiles (1 row, 1-2k columns)
    narrow = len(sys.argv) > 2 and sys.argv[2] == "narrow"
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  SMs {sms}", flush=True)
    rows = []
    grid = [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product(
        (4, 8, 16, 32), (256, 512), (4, 8), (1, 3))]
    shapes = SHAPES
    if narrow:
        grid = [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product((1, 2, 4), (512, 1024, 2048), (4, 8), (1, 3))]
        shapes = {name: shape for name, shape in SHAPES.items() if name in ("llama1b.qkv", "llama1b.o", "llama1b.down")}
    for name, (out_features, in_features) in shapes.items():
        weight_bytes = out_features * in_features * 2
        copies = max(2, min(64, (1 << 30) // weight_bytes + 1))
        weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
                   for _ in range(copies)]
        x = torch.randn(1, in_features, device=device, dtype=torch.bfloat16)
        reference = F.linear(x.float(), weights[0].float())
        error = (gemv(x, weights[0]).float() - reference).abs().max().item()
        scale = reference.abs().max().item()
        cublas = timed_graph(lambda i: F.linear(x, weights[i]), copies)
        default = gemv_config(out_features, in_features, sms)
        # Programmatic dependent launch between the chained GEMVs (JOULE_PDL is read at each launch, so each
        # captured graph has it on or off) and 0-2 weight tiles loaded before the wait.
        variants = {}
        for pdl, tiles in ((0, 0), (1, 0), (1, 1), (1, 2)):
            os.environ["JOULE_PDL"] = str(pdl)
            config = dataclasses.replace(default, prefetch_tiles=tiles)
            variants[f"pdl{pdl}_prefetch{tiles}"] = 1e6 * timed_graph(lambda i: gemv(x, weights[i], config=config),
                                                                      copies)
        os.environ["JOULE_PDL"] = "1"
        ours = timed_graph(lambda i: gemv(x, weights[i], config=default), copies)
        print(f"  {name}: " + "  ".join(f"{key} {value:.2f} us" for key, value in variants.items()), flush=True)
        best_config, best = default, ours
        for config in grid:
            if config.block_k > max(256, triton_pow2(in_features)):
                continue
            try:
                seconds = timed_graph(lambda i: gemv(x, weights[i], config=config), copies, repeats=3)
            except Exception as failure:  # noqa: BLE001 - a config the compiler rejects
                print(f"  {name} {config}: {failure!r}"[:160])
                continue
            if seconds < best:
                best_config, best = config, seconds
        row = {"shape": name, "out": out_features, "in": in_features, "max_abs_error": error, "max_abs": scale,
               "cublas_us": cublas * 1e6, "gemv_default_us": ours * 1e6, "gemv_best_us": best * 1e6,
               "best_config": best_config.__dict__, "default_config": default.__dict__,
               "cublas_bw": weight_bytes / cublas / bandwidth, "default_bw": weight_bytes / ours / bandwidth,
               "best_bw": weight_bytes / best / bandwidth, "pdl_variants_us": variants}
        rows.append(row)
        print(f"{name:16s} {out_features:6d}x{in_features:5d}  cuBLAS {cublas * 1e6:7.1f} us ({row['cublas_bw']:.0%})"
              f"  gemv {ours * 1e6:7.1f} us ({row['default_bw']:.0%})  best {best * 1e6:7.1f} us ({row['best_bw']:.0%})"
              f" {best_config}  err {error:.2e}/{scale:.2e}", flush=True)
        del weights
        torch.cuda.empty_cache()
    if out_path:
        with open(out_path, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": bandwidth, "rows": rows}, handle, indent=2)


def triton_pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()


if __name__ == "__main__":
    main()
