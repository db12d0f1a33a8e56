"""The split-K GEMM (joule/kernels/split_k_linear.py) against cuBLAS at decode rows, graph-timed, weights from DRAM.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/split_k_sweep.py [out.json]
Prints, per projection of Llama-3.2-1B and Qwen3-0.6B and per row count of the decode graphs (64-256), cuBLAS's time,
the best tile's (the start-up tuner's list and a few more), the gain and the largest difference from cuBLAS's values;
every tile's time goes to the JSON. ~1-2 minutes.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_gemm_sweep import ROTATE_BYTES, SHAPES, graph_us  # noqa: E402

from joule.kernels.split_k_linear import SplitTile, SplitWorkspace, split_k_linear  # noqa: E402
from joule.runtime.linear_tuning import MAX_WORKSPACE_BYTES, decode_split_tiles  # noqa: E402

ROWS = [64, 96, 128, 192, 256]
EXTRA_TILES = (SplitTile(256, 64, 64, 2, 8, 3), SplitTile(128, 128, 128, 2, 8, 2), SplitTile(128, 128, 64, 8, 8, 3),
               SplitTile(64, 64, 64, 4, 4, 4), SplitTile(128, 256, 64, 2, 8, 2), SplitTile(128, 128, 64, 2, 8, 4))


def name(tile: SplitTile) -> str:
    return f"{tile.block_m}x{tile.block_n}x{tile.block_k}/{tile.splits} w{tile.num_warps} s{tile.num_stages}"


def main(out_path: str) -> None:
    device = torch.device("cuda")
    workspace = SplitWorkspace(device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16", flush=True)
    print(f"{'model':<13} {'proj':<8} {'rows':>5} {'cuBLAS us':>10} {'best us':>9} {'gain':>7}  {'tile':<24} "
          f"{'max diff':>9}", flush=True)
    results = []
    for model, projection, out_features, in_features in SHAPES:
        copies = max(1, -(-ROTATE_BYTES // (2 * out_features * in_features)))
        generator = torch.Generator().manual_seed(out_features + in_features)
        weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(device,
                                                                                                      torch.bfloat16)
        weights = [weight] + [weight.clone() for _ in range(copies - 1)]
        for rows in ROWS:
            hidden = (torch.randn(rows, in_features, generator=generator) * 0.5).to(device, torch.bfloat16)
            reference = F.linear(hidden, weight).float()
            turn = itertools.count()
            row = {"model": model, "projection": projection, "rows": rows,
                   "cublas_us": graph_us(lambda: F.linear(hidden, weights[next(turn) % copies])), "tiles": {}}
            worst = 0.0
            for tile in decode_split_tiles() + EXTRA_TILES:
                if not tile.fits(in_features) or 4 * tile.workspace_elements(rows, out_features) > MAX_WORKSPACE_BYTES:
                    continue
                try:
                    output = split_k_linear(hidden, weight, tile, workspace).float()
                    worst = max(worst, float((output - reference).abs().max()))
                    turn = itertools.count()
                    row["tiles"][name(tile)] = graph_us(
                        lambda tile=tile: split_k_linear(hidden, weights[next(turn) % copies], tile, workspace))
                except Exception as failure:  # noqa: BLE001 - a tile the compiler refuses: note it, go on
                    row["tiles"][name(tile)] = repr(failure)[:80]
            timed = {key: value for key, value in row["tiles"].items() if isinstance(value, float)}
            best = min(timed, key=timed.get) if timed else None
            row["max_difference"] = worst
            results.append(row)
            if best:
                gain = 100 * (timed[best] / row["cublas_us"] - 1)
                print(f"{model:<13} {projection:<8} {rows:>5} {row['cublas_us']:>10.2f} {timed[best]:>9.2f} "
                      f"{gain:>+6.1f}%  {best:<24} {worst:>9.3g}", flush=True)
    with open(out_path, "w") as file:
        json.dump({"device": torch.cuda.get_device_name(), "rows": results}, file)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "split_k_sweep.json")
