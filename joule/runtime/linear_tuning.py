"""Which decode row counts run the projections through the split-K GEMM: measured on the GPU at start-up, before the
decode graphs are captured (they record whichever kernel each batch size runs).

Why measure: whether ``joule.kernels.split_k_linear`` beats cuBLAS depends on the projection's shape, the row count
and the GPU (docs/benchmarks.md, 2026-12-07 (s)); a measurement on the engine's own weights decides, as
``gate_up_tuning`` does for the fused gate/up GEMM.

How: for each captured batch size from ``MIN_TUNED_ROWS`` up and each projection shape of the model (q/k/v, o,
gate/up, down and the output projection), every tile of ``DECODE_SPLIT_TILES`` that splits the inner dimension
evenly is timed against cuBLAS in a CUDA graph (``gate_up_tuning.graph_time_us``); one that is ``MIN_GAIN`` faster and
gives cuBLAS's values to 16-bit rounding is kept for that row count. Off until measured on a GPU end to end:
``JOULE_TUNE_DECODE_LINEAR=1`` turns it on (unset or 0: cuBLAS at every row count).
"""

from __future__ import annotations

import logging
import os
import time

import torch
import torch.nn.functional as F

from joule.runtime.gate_up_tuning import MIN_GAIN, MIN_TUNED_ROWS, Timer, graph_time_us, time_if_matching

logger = logging.getLogger(__name__)

TUNING_ENV = "JOULE_TUNE_DECODE_LINEAR"
MAX_TUNED_ROWS = 512  # beyond a decode step's sizes cuBLAS's own large tiles fill the GPU
MAX_WORKSPACE_BYTES = 32 << 20  # split partials of a wide projection (the output one's) cost more than they save


def decode_split_tiles() -> tuple:
    """The tiles tried at each shape: 128 x 128 output tiles over 1-4 splits, and narrower ones (imported late: the
    kernel module needs Triton)."""
    from joule.kernels.split_k_linear import SplitTile

    return (SplitTile(128, 128, 64, 1, 8, 3), SplitTile(128, 128, 64, 2, 8, 3), SplitTile(128, 128, 64, 4, 8, 3),
            SplitTile(128, 64, 64, 2, 4, 4), SplitTile(128, 64, 64, 4, 4, 4), SplitTile(64, 128, 64, 2, 4, 4),
            SplitTile(64, 128, 64, 4, 4, 4))


def tuning_enabled() -> bool:
    return os.environ.get(TUNING_ENV, "0").strip() not in ("", "0", "false", "off")


def tune_decode_linears(model: torch.nn.Module, batch_sizes: list[int], timer: Timer = graph_time_us) -> int:
    """Measure and set ``row_tiles`` (and one shared workspace) on every merged projection that takes the split-K
    GEMM; returns how many (shape, row count) pairs chose a tile."""
    from joule.model.layers import MergedLinear

    if not tuning_enabled():
        return 0
    projections = [module for module in model.modules()
                   if isinstance(module, MergedLinear) and module.fits_split_k()]
    if not projections:
        return 0
    from joule.kernels.split_k_linear import SplitWorkspace

    workspace = SplitWorkspace(projections[0].weight.device)
    row_counts = [rows for rows in sorted(set(batch_sizes)) if MIN_TUNED_ROWS <= rows <= MAX_TUNED_ROWS]
    chosen_by_shape: dict[tuple, dict] = {}
    started = time.perf_counter()
    for projection in projections:
        weight = projection.weight
        key = (tuple(weight.shape), weight.dtype)
        if key not in chosen_by_shape:
            chosen_by_shape[key] = _tune_shape(weight, row_counts, workspace, timer)
        projection.row_tiles = dict(chosen_by_shape[key])
        projection.split_workspace = workspace
    logger.info("split-K projections at decode rows (measured in %.1f s): %s", time.perf_counter() - started,
                "; ".join(f"{'x'.join(map(str, shape))}: " + (", ".join(
                    f"{rows} rows {tile.block_m}x{tile.block_n}x{tile.block_k}/{tile.splits}"
                    for rows, tile in chosen.items()) or "cuBLAS")
                    for (shape, _), chosen in chosen_by_shape.items()))
    return sum(len(chosen) for chosen in chosen_by_shape.values())


def _tune_shape(weight: torch.Tensor, row_counts: list[int], workspace, timer: Timer) -> dict:
    from joule.kernels.split_k_linear import split_k_linear

    chosen = {}
    for rows in row_counts:
        tiles = [tile for tile in decode_split_tiles() if tile.fits(weight.shape[1])
                 and 4 * tile.workspace_elements(rows, weight.shape[0]) <= MAX_WORKSPACE_BYTES]
        hidden = torch.randn((rows, weight.shape[1]), dtype=weight.dtype, device=weight.device) * 0.1
        reference = F.linear(hidden, weight)
        cublas = timer(lambda: F.linear(hidden, weight))
        timed = [(time_if_matching(timer, lambda tile=tile: split_k_linear(hidden, weight, tile, workspace), reference,
                                   f"split-K tile {tile}", "cuBLAS"), tile) for tile in tiles]
        if timed:
            fastest, tile = min(timed, key=lambda pair: pair[0])
            if fastest < (1.0 - MIN_GAIN) * cublas:
                chosen[rows] = tile
    return chosen
