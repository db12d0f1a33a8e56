"""The fused gate/up + SiLU GEMM (TMA descriptors) against cuBLAS + ``silu_and_mul``, graph-timed (~1 minute).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/gate_up_silu_sweep.py [--plain] [--model NAME]
[out.json [ROWS,...]]
Llama-3.2-1B's MLP (hidden 2048, intermediate 8192; ``--model`` qwen3-0.6b: 1024 / 3072, llama-3.1-8b: 4096 / 14336), bf16, 16 distinct weights called in turn (from DRAM, as in the
engine), at a prompt step's 8,192 rows, a mixed step's 8,432, 2,048 and a decode step's 256. For each shape: the
engine's path (cuBLAS GEMM, then ``silu_and_mul``), the GEMM alone, and every tile of ``TILES`` with its largest
difference to the engine's path. The last line per shape names the best tile as ``JOULE_FUSED_GATE_UP`` takes it.
``--specialized``: the two-product 128 x 128 tile (the default before 2026-12-06 (q)) and the warp-specialized and
stacked ones only (the stacked 128 x 128 tile is the default now).
``--plain``: the other projections (q/k/v, o, down) through ``tma_linear`` against cuBLAS, at 8,192 and 256 rows:
whether a persistent TMA GEMM could stand in for cuBLAS everywhere (what running prompt chunks on part of the
processors would need).
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import timed_graph  # noqa: E402

from joule.kernels.activation import silu_and_mul  # noqa: E402
from joule.kernels.gate_up_config import GateUpTile, tile_setting  # noqa: E402
from joule.kernels.gate_up_silu import gate_up_silu, tma_linear  # noqa: E402

COPIES = 16
MLP_SHAPES = {"llama-3.2-1b": (2048, 8192), "qwen3-0.6b": (1024, 3072), "llama-3.1-8b": (4096, 14336)}
MODEL = sys.argv[sys.argv.index("--model") + 1] if "--model" in sys.argv else "llama-3.2-1b"
HIDDEN, INTERMEDIATE = MLP_SHAPES[MODEL]
TILES = [GateUpTile(128, 128, 64, 8, 3, 8, False), GateUpTile(128, 128, 64, 8, 4, 8, False),
         GateUpTile(128, 128, 64, 8, 3, 8, True), GateUpTile(128, 128, 32, 8, 4, 8, False),
         GateUpTile(128, 64, 64, 4, 4, 8, False), GateUpTile(128, 64, 64, 8, 4, 8, False),
         GateUpTile(128, 64, 64, 4, 4, 8, True), GateUpTile(64, 128, 64, 4, 3, 8, False),
         GateUpTile(256, 64, 64, 8, 3, 8, False), GateUpTile(64, 64, 64, 4, 4, 8, False),
         # 2026-12-06 (o): persistent tiles with the tile loop and the inner loop pipelined as one (flatten)
         GateUpTile(128, 128, 64, 8, 3, 8, True, flatten=True), GateUpTile(128, 128, 64, 8, 4, 8, True, flatten=True),
         GateUpTile(128, 128, 64, 8, 2, 8, True, flatten=True),
         # 2026-12-06 (p): warp-specialized (a producer warpgroup, two consumers; 4 warps ask for one warpgroup each)
         GateUpTile(128, 128, 64, 4, 3, 8, True, warp_specialize=True),
         GateUpTile(128, 128, 64, 4, 4, 8, True, warp_specialize=True),
         GateUpTile(128, 128, 64, 4, 2, 8, True, warp_specialize=True),
         GateUpTile(128, 128, 64, 4, 3, 16, True, warp_specialize=True),
         GateUpTile(128, 128, 64, 4, 3, 8, False, warp_specialize=True),
         GateUpTile(128, 64, 64, 4, 4, 8, True, warp_specialize=True),
         GateUpTile(128, 128, 32, 4, 6, 8, True, warp_specialize=True),
         # 2026-12-06 (p): gate and up as one [2, N, K] box and one product a step (what the specialized ones run)
         GateUpTile(128, 128, 64, 8, 3, 8, True, stacked=True), GateUpTile(128, 128, 64, 8, 4, 8, True, stacked=True),
         GateUpTile(128, 128, 64, 8, 3, 8, False, stacked=True)]


if "--specialized" in sys.argv:  # the two-product tile and the warp-specialized and stacked ones only
    TILES = [GateUpTile()] + [tile for tile in TILES if tile.warp_specialize or tile.stacked]
PLAIN = {"qkv": (3072, HIDDEN), "o": (HIDDEN, HIDDEN), "down": (HIDDEN, INTERMEDIATE)}


def plain_sweep(device: torch.device, rows_to_time: list[int]) -> list[dict]:
    """Each projection without an epilogue: cuBLAS against ``tma_linear`` with every tile of ``TILES``."""
    results = []
    for name, (out_features, in_features) in PLAIN.items():
        weights = [torch.randn(out_features, in_features, device=device, dtype=torch.bfloat16) * 0.02
                   for _ in range(COPIES)]
        for rows in rows_to_time:
            hidden = torch.randn(rows, in_features, device=device, dtype=torch.bfloat16)
            expected = F.linear(hidden, weights[0]).float()
            cublas_us = 1e6 * timed_graph(lambda index: F.linear(hidden, weights[index]), COPIES)
            row = dict(projection=name, rows=rows, cublas_us=cublas_us, tiles={})
            for tile in TILES:
                try:
                    difference = (tma_linear(hidden, weights[0], tile).float() - expected).abs().max().item()
                    micros = 1e6 * timed_graph(lambda index, tile=tile: tma_linear(hidden, weights[index], tile),
                                               COPIES)
                except Exception as failure:  # noqa: BLE001 - a tile the compiler or the GPU rejects
                    print(f"  {name} {rows} {tile_setting(tile)}: {failure!r}"[:200], flush=True)
                    continue
                row["tiles"][tile_setting(tile)] = {"us": micros, "max_difference": difference}
            if row["tiles"]:
                best = min(row["tiles"], key=lambda key: row["tiles"][key]["us"])
                row["best"] = best
                print(f"plain {name:4s} {rows:5d}: cuBLAS {cublas_us:7.1f} us, best TMA {best} "
                      f"{row['tiles'][best]['us']:7.1f} us ({100 * (row['tiles'][best]['us'] / cublas_us - 1):+.1f} %)"
                      f", max|diff| {row['tiles'][best]['max_difference']:.4f}", flush=True)
            results.append(row)
    return results


def main() -> None:
    flags = ("--plain", "--model", MODEL, "--specialized")
    arguments = [argument for argument in sys.argv[1:] if argument not in flags]
    out_path = arguments[0] if arguments else None
    device = torch.device("cuda")
    if "--plain" in sys.argv:
        rows = [int(value) for value in arguments[1].split(",")] if len(arguments) > 1 else [8192, 256]
        results = plain_sweep(device, rows)
        if out_path:
            with open(out_path, "w") as handle:
                json.dump(results, handle, indent=1)
        return
    weights = [torch.randn(2 * INTERMEDIATE, HIDDEN, device=device, dtype=torch.bfloat16) * 0.02
               for _ in range(COPIES)]
    results = []
    rows_to_time = [int(value) for value in arguments[1].split(",")] if len(arguments) > 1 else [8192, 8432, 2048, 256]
    for rows in rows_to_time:
        hidden = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16)
        flops = 2 * rows * HIDDEN * 2 * INTERMEDIATE
        expected = silu_and_mul(F.linear(hidden, weights[0])).float()
        engine_us = 1e6 * timed_graph(lambda index: silu_and_mul(F.linear(hidden, weights[index])), COPIES)
        gemm_us = 1e6 * timed_graph(lambda index: F.linear(hidden, weights[index]), COPIES)
        row = dict(model=MODEL, rows=rows, engine_us=engine_us, gemm_only_us=gemm_us, tiles={})
        print(f"gate_up {MODEL} {rows:5d}: cuBLAS + silu_and_mul {engine_us:7.1f} us ({flops / engine_us / 1e6:5.0f} TFLOP/s),"
              f" GEMM alone {gemm_us:7.1f} us", flush=True)
        for tile in TILES:
            try:
                difference = (gate_up_silu(hidden, weights[0], tile).float() - expected).abs().max().item()
                micros = 1e6 * timed_graph(lambda index, tile=tile: gate_up_silu(hidden, weights[index], tile), COPIES)
            except Exception as failure:  # noqa: BLE001 - a tile the compiler or the GPU rejects
                print(f"  {tile_setting(tile)}: {failure!r}"[:200], flush=True)
                continue
            row["tiles"][tile_setting(tile)] = {"us": micros, "max_difference": difference, **asdict(tile)}
            print(f"  fused {tile_setting(tile):22s} {micros:7.1f} us ({flops / micros / 1e6:5.0f} TFLOP/s) "
                  f"{100 * (micros / engine_us - 1):+6.1f} % vs engine  max|diff| {difference:.4f}", flush=True)
        if row["tiles"]:
            best = min(row["tiles"], key=lambda name: row["tiles"][name]["us"])
            row["best"] = best
            print(f"gate_up {MODEL} {rows:5d} best {best} {row['tiles'][best]['us']:.1f} us against {engine_us:.1f}",
                  flush=True)
        results.append(row)
    if out_path:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
