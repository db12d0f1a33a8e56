"""Which decode row counts run the fused gate/up + SiLU GEMM: measured on the GPU at start-up, before the decode
graphs are captured (they record whichever kernel each batch size runs).

Why measure: at decode rows the fused GEMM (``joule.kernels.gate_up_silu``) wins or loses by the model's shape and
the row count. On one H100 (2026-12-06 (k), ``benchmarks/gpu/gate_up_silu_sweep.py``, weights from DRAM, against
cuBLAS + ``silu_and_mul``): Llama-3.2-1B's MLP at 256 rows 33.2 against 36.4 us (-8.8 %), 128 rows 28.4 against
30.9 (64 x 64 tiles), 192 rows -2.8 %, 384 rows +26 %; Qwen3-0.6B's +6 to +93 % at 128-256 rows; Llama-3.1-8B's
+0.1 % at 256. No fixed rule fits; a measurement on the engine's own weights does. Workload 3 of issue 3 runs ~110
decode steps at 256 rows: ~3 us a layer there is ~0.6 % of the run. Measured end to end (H100, 2026-12-06 (o),
``bs1_ab.py --w3 JOULE_TUNE_DECODE_GATE_UP=0,1``, three rounds): +0.1 to +0.3 % a round, the tuner choosing 96, 128
and 256 rows for Llama-3.2-1B and nothing for Qwen3-0.6B or Llama-3.1-8B.

How: for each captured batch size from ``MIN_TUNED_ROWS`` up (below ``FUSED_MIN_ROWS``, where long steps already run
it), one layer's weight, each variant captured ``LAUNCHES`` times in a CUDA graph (a launch's host work, which the
decode graphs do not pay, stays out of the timing) and replayed; a tile is kept where it beats cuBLAS +
``silu_and_mul`` by ``MIN_GAIN`` and its output matches theirs (a miscompiled tile is never chosen: Triton 3.6's
warp-specialized pipeline returned NaNs for some tiles, 2026-12-06 (p)). ``JOULE_TUNE_DECODE_GATE_UP=0`` skips it
(cuBLAS at every decode row count).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch

from joule.kernels.gate_up_config import FUSED_MIN_ROWS, GateUpTile, tile_setting
from joule.runtime.graph_timing import repeated_graph

logger = logging.getLogger(__name__)

TUNING_ENV = "JOULE_TUNE_DECODE_GATE_UP"
# The three tiles that won somewhere at 128-384 rows in the sweep above (not persistent, four stages), and the
# stacked 128 x 128 tile (gate and up as one product), persistent and not: on one H200 at 256 rows (2026-12-06 (q))
# 28.6 us persistent with four stages against 33.2 for cuBLAS + silu_and_mul.
DECODE_TILES = (GateUpTile(128, 128, 64, 8, 4, 8, False), GateUpTile(128, 64, 64, 8, 4, 8, False),
                GateUpTile(64, 64, 64, 4, 4, 8, False), GateUpTile(128, 128, 64, 8, 4, 8, True, stacked=True),
                GateUpTile(128, 128, 64, 8, 4, 8, False, stacked=True))
MIN_TUNED_ROWS = 64  # at 16 rows no tile came near cuBLAS; smaller steps are weight reads either way
MIN_GAIN = 0.03  # below this a choice is within the timing's noise
LAUNCHES = 10
REPLAYS = 5

Timer = Callable[[Callable[[], object]], float]


def graph_time_us(run: Callable[[], object]) -> float:
    """Microseconds a launch of ``run``, the best of ``REPLAYS`` replays of a graph of ``LAUNCHES`` launches."""
    graph = repeated_graph(run, LAUNCHES)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(REPLAYS):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / LAUNCHES)
    del graph
    return best


def tune_decode_gate_up(model: torch.nn.Module, batch_sizes: list[int], timer: Timer = graph_time_us) -> int:
    """Measure and set ``row_tiles`` of every gated MLP that runs the fused GEMM (one measurement per weight shape);
    returns how many row counts chose a tile."""
    from joule.kernels.gate_up_silu import gate_up_silu
    from joule.model.layers import GatedMLP, swiglu

    if os.environ.get(TUNING_ENV, "1").strip() in ("0", "false", "off"):
        return 0
    mlps = [module for module in model.modules()
            if isinstance(module, GatedMLP) and module.fused_tile is not None and module.gate_up_proj is not None]
    chosen_by_shape: dict[tuple, dict[int, GateUpTile]] = {}
    started = time.perf_counter()
    for mlp in mlps:
        weight = mlp.gate_up_proj.weight
        key = (tuple(weight.shape), weight.dtype)
        if key not in chosen_by_shape:
            chosen: dict[int, GateUpTile] = {}
            measured = False
            for rows in sorted(set(batch_sizes)):
                if not MIN_TUNED_ROWS <= rows < FUSED_MIN_ROWS:
                    continue
                hidden = torch.randn((rows, weight.shape[1]), dtype=weight.dtype, device=weight.device) * 0.1
                if not mlp.gate_up_proj.fits_fused_gate_up(hidden):
                    break  # the dtype, device or weight do not take it at any row count
                projection, measured = mlp.gate_up_proj, True
                unfused = timer(lambda: swiglu(projection(hidden)))
                reference = swiglu(projection(hidden))
                timed = [(_time_or_inf(timer, lambda tile=tile: gate_up_silu(hidden, weight, tile), tile, reference),
                          tile) for tile in DECODE_TILES]
                fastest, tile = min(timed, key=lambda pair: pair[0])
                if fastest < (1.0 - MIN_GAIN) * unfused:
                    chosen[rows] = tile
            chosen_by_shape[key] = chosen
            if measured:  # a float32 model, or a GPU without tensor-memory copies, never runs it: nothing to say
                logger.info("fused gate/up + SiLU at decode rows (weight %s): %s (measured in %.1f s)",
                            "x".join(map(str, key[0])),
                            ", ".join(f"{rows} rows {tile_setting(tile)}" for rows, tile in chosen.items())
                            or "none faster than cuBLAS + silu_and_mul", time.perf_counter() - started)
        mlp.row_tiles = dict(chosen_by_shape[key])
    return sum(len(chosen) for chosen in chosen_by_shape.values())


def _time_or_inf(timer: Timer, run: Callable[[], torch.Tensor], tile: GateUpTile, reference: torch.Tensor) -> float:
    """A tile the compiler or this GPU refuses, or whose output differs from ``reference``, is never chosen; the engine
    starts with cuBLAS there."""
    try:
        if not output_matches(run(), reference):
            logger.warning("fused gate/up tile %s gave values unlike cuBLAS + silu_and_mul at %d rows: not used",
                           tile_setting(tile), reference.shape[0])
            return float("inf")
        return timer(run)
    except Exception as failure:  # noqa: BLE001 - any compile or launch failure: skip the tile, keep starting
        logger.warning("fused gate/up tile %s not timed: %r", tile_setting(tile), failure)
        return float("inf")


def output_matches(output: torch.Tensor, reference: torch.Tensor) -> bool:
    """Finite, of the reference's shape, and within 16-bit rounding of it (the fused GEMM rounds the projections
    where the unfused path does: the sweeps measured differences of 0 to 1e-4)."""
    if output.shape != reference.shape or not bool(torch.isfinite(output).all()):
        return False
    scale = float(reference.abs().max())
    return float((output.float() - reference.float()).abs().max()) <= 1e-2 * scale + 1e-3
