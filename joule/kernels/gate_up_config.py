"""Which tile the fused gate/up + SiLU GEMM (``joule.kernels.gate_up_silu``) runs, and whether it runs at all.

Kept apart from the kernel so the model can read the switch without importing Triton (CPU installs may lack it).
Measured on one H100 80GB (2026-12-06 (j), ``benchmarks/gpu/gate_up_silu_sweep.py``, Llama-3.2-1B's MLP, weights
from DRAM): the persistent 128 x 128 x 64 tile, three stages, took 809.8 us at 8,192 rows against 833.3 for cuBLAS +
``silu_and_mul`` (-2.8 %) and 216.7 against 230.9 us at 2,048 (-6.1 %); workload 3 gained in each of three rounds
(median 27,773 against 26,959 tok/s, ``bs1_ab.py --w3``), workload 2 +2.4 % in one. Hence on by default for steps of
``FUSED_MIN_ROWS`` rows or more on sm_90+ (its tiles come through Hopper's tensor-memory copies).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

FUSED_GATE_UP_ENV = "JOULE_FUSED_GATE_UP"
# Shorter steps keep cuBLAS + silu_and_mul: the tile was chosen at 2k-8k rows (at 256 rows it ran 37.0 against 37.6 us).
FUSED_MIN_ROWS = 1024


@dataclass(frozen=True)
class GateUpTile:
    """One launch shape: output tile, inner step, warps, pipeline stages, L2 grouping, persistent programs."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3
    group_m: int = 8
    persistent: bool = True
    # A persistent tile's loop over tiles and its inner loop pipelined as one (Triton's ``tl.range(flatten=...)``),
    # so the next tile's first loads overlap this one's last steps and epilogue. Off: slower where measured (H100,
    # 2026-12-06 (o), gate_up_silu_sweep.py: 943-952 against 852 us at 8,192 rows, 34.9 against 33.3 at 256).
    flatten: bool = False
    # A producer warpgroup loading tiles for two consumer warpgroups (Triton's ``tl.range(warp_specialize=True)``,
    # Hopper's path since Triton 3.4): the structure of cuBLAS's sm_90 GEMMs. Takes ``num_warps`` 4 (one warpgroup;
    # Triton adds the others) and descriptors the kernel makes itself.
    warp_specialize: bool = False
    # The gate and up tiles loaded as one [2, N, K] box and multiplied once a step (the input tile read once, not
    # twice). Warp-specialized tiles always run this way.
    stacked: bool = False


# The persistent 128 x 128 x 64 tile, three stages, gate and up stacked into one product a step. On one H200
# (2026-12-06 (q), gate_up_silu_sweep.py --specialized, weights from DRAM): 763.6 us at 8,192 rows against 815.1 for
# the same tile with two products (-6.3 %) and 809.8 for cuBLAS + silu_and_mul; 30.5 against 33.4 us at 256 rows; the
# same values bit for bit. Workload 3 (bs1_ab.py --w3, alternated, two rounds): 40,537 against 40,298 tok/s (+0.6 %).
DEFAULT_TILE = GateUpTile(stacked=True)


def tile_setting(tile: GateUpTile) -> str:
    """``tile`` as ``JOULE_FUSED_GATE_UP`` takes it: its seven numbers joined by "x", then the flatten, warp
    specialization and stacking switches if any is on."""
    values = (tile.block_m, tile.block_n, tile.block_k, tile.num_warps, tile.num_stages, tile.group_m,
              tile.persistent)
    if tile.flatten or tile.warp_specialize or tile.stacked:
        values += (tile.flatten, tile.warp_specialize, tile.stacked)
    return "x".join(str(int(value)) for value in values)


def fused_gate_up_tile() -> GateUpTile | None:
    """``JOULE_FUSED_GATE_UP``: unset or "1" the default tile, "0" off (cuBLAS + ``silu_and_mul``), or a tile as
    ``tile_setting`` writes it (block_m x block_n x block_k x warps x stages x group_m x persistent [x flatten
    [x warp_specialize [x stacked]]])."""
    text = os.environ.get(FUSED_GATE_UP_ENV, "").strip()
    if text == "0":
        return None
    if text in ("", "1"):
        return DEFAULT_TILE
    parts = text.split("x")
    if len(parts) not in (7, 8, 9, 10) or not all(part.isdigit() for part in parts):
        raise ValueError(f"{FUSED_GATE_UP_ENV} must be 0, 1 or seven numbers joined by 'x' (block_m x block_n x "
                         f"block_k x warps x stages x group_m x persistent, then x 1 to flatten, then x 1 to warp "
                         f"specialize, then x 1 to stack), got {text!r}")
    numbers = [int(part) for part in parts] + [0, 0, 0]
    return GateUpTile(*numbers[:6], persistent=bool(numbers[6]), flatten=bool(numbers[7]),
                      warp_specialize=bool(numbers[8]), stacked=bool(numbers[9]))
