"""``x @ W.T`` for a decode step's few hundred rows: large tiles, the inner dimension split over programs.

Why: at 256 rows cuBLAS runs Llama-3.2-1B's q/k/v, o and down projections at 43-61 % of their weight bytes' or FLOPs'
floor (docs/benchmarks.md, 2026-12-06 (i)): it picks 64 x 64 tiles to fill the GPU, and each program then reads its
slice of the input and of the weight from L2 over the whole inner dimension, ~8x the weight's bytes through L2 in all
(down: ~270 MB a call for a 34 MB weight). 128 x 128 tiles halve that traffic but make too few programs (down: 32 on
132 processors); splitting the inner dimension over ``splits`` programs restores the count.
How: the grid is (output tiles, splits); a program walks its 1/``splits`` of the inner dimension through
tensor-memory descriptors into a float32 tile. With one split it writes the output. Otherwise it writes its tile to a
float32 workspace and counts its arrival; the tile's last program to arrive adds the ``splits`` partials in split
order (the same sum whichever program is last, so a step's tokens do not depend on the programs' timing), writes the
output and sets the counter back to zero for the next launch. Used where the start-up tuner
(``joule/runtime/linear_tuning.py``) measured it faster than cuBLAS on the engine's own weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from joule.kernels.common import cdiv, dot_precision, interpreting


@dataclass(frozen=True)
class SplitTile:
    """One launch shape: output tile, inner step, splits of the inner dimension, warps, pipeline stages."""

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    splits: int = 2
    num_warps: int = 8
    num_stages: int = 3

    def fits(self, in_features: int) -> bool:
        """Whether the inner dimension splits into whole steps of ``block_k``."""
        return in_features % (self.splits * self.block_k) == 0

    def workspace_elements(self, rows: int, out_features: int) -> int:
        """float32 partials one launch writes (none with one split)."""
        if self.splits == 1:
            return 0
        return self.splits * cdiv(rows, self.block_m) * self.block_m * cdiv(out_features, self.block_n) * self.block_n

    def num_tiles(self, rows: int, out_features: int) -> int:
        return cdiv(rows, self.block_m) * cdiv(out_features, self.block_n)


class SplitWorkspace:
    """The partials and arrival counters that split launches share. One per model: its launches run one after
    another on one stream, and each leaves its counters at zero. Sized before any CUDA graph is captured (the graphs
    record its addresses), and never shrunk."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.partials = torch.empty(0, dtype=torch.float32, device=device)
        self.arrivals = torch.zeros(0, dtype=torch.int32, device=device)

    def reserve(self, partial_elements: int, tiles: int) -> None:
        """Grow to hold a launch of ``partial_elements`` partials over ``tiles`` output tiles."""
        if partial_elements > self.partials.numel():
            self.partials = torch.empty(partial_elements, dtype=torch.float32, device=self.device)
        if tiles > self.arrivals.numel():
            self.arrivals = torch.zeros(tiles, dtype=torch.int32, device=self.device)


@triton.jit(do_not_specialize=["rows"])
def _split_k_linear_kernel(x_descriptor, weight_descriptor, output_ptr, partial_ptr, arrivals_ptr, rows,
                           out_features, stride_output, split_length, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, SPLITS: tl.constexpr, PRECISION: tl.constexpr,
                           UPCAST: tl.constexpr):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    row_blocks = tl.cdiv(rows, BLOCK_M)
    row = (tile % row_blocks) * BLOCK_M  # a weight tile's row blocks run side by side and share it in L2
    column = (tile // row_blocks) * BLOCK_N
    first = split * split_length
    total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for inner in range(first, first + split_length, BLOCK_K):
        x = x_descriptor.load([row, inner])
        weight = weight_descriptor.load([column, inner])
        if UPCAST:  # the interpreter's tl.dot mishandles 16-bit operands
            total += tl.dot(x.to(tl.float32), weight.to(tl.float32).T, input_precision="ieee")
        else:
            total = tl.dot(x, weight.T, total, input_precision=PRECISION)
    row_index = row + tl.arange(0, BLOCK_M)
    column_index = column + tl.arange(0, BLOCK_N)
    mask = (row_index < rows)[:, None] & (column_index < out_features)[None, :]
    output = output_ptr + row_index[:, None].to(tl.int64) * stride_output + column_index[None, :]
    if SPLITS == 1:
        tl.store(output, total.to(output_ptr.dtype.element_ty), mask=mask)
    else:
        within = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tiles = tl.num_programs(0)
        tl.store(partial_ptr + (split * tiles + tile).to(tl.int64) * (BLOCK_M * BLOCK_N) + within, total,
                 cache_modifier=".cg")
        tl.debug_barrier()  # every thread's partial written before the one thread that counts the arrival
        arrived = tl.atomic_add(arrivals_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLITS - 1:
            summed = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for part in tl.static_range(SPLITS):
                summed += tl.load(partial_ptr + (part * tiles + tile).to(tl.int64) * (BLOCK_M * BLOCK_N) + within,
                                  cache_modifier=".cg")
            tl.store(output, summed.to(output_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(arrivals_ptr + tile, 0)


def split_k_linear(hidden: torch.Tensor, weight: torch.Tensor, tile: SplitTile,
                   workspace: SplitWorkspace | None = None) -> torch.Tensor:
    """``hidden [T, K] @ weight [N, K].T`` as ``[T, N]`` in ``hidden``'s dtype. ``workspace``: where split tiles
    meet (grown here if short; one per model, see ``SplitWorkspace``); needed when ``tile.splits`` > 1."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"split_k_linear: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be "
                         "[T, K] and [N, K]")
    if hidden.dtype != weight.dtype or hidden.stride(1) != 1 or weight.stride(1) != 1:
        raise ValueError("split_k_linear: hidden and weight must share a dtype and have contiguous rows")
    if any((stride * hidden.element_size()) % 16 for stride in (hidden.stride(0), weight.stride(0))):
        raise ValueError("split_k_linear: row strides must be multiples of 16 bytes (tensor-memory descriptors)")
    rows, in_features = hidden.shape
    out_features = weight.shape[0]
    if not tile.fits(in_features):
        raise ValueError(f"split_k_linear: in_features {in_features} does not split into {tile.splits} ranges of "
                         f"whole {tile.block_k}-wide steps")
    output = torch.empty((rows, out_features), dtype=hidden.dtype, device=hidden.device)
    if rows == 0:
        return output
    tiles = tile.num_tiles(rows, out_features)
    if tile.splits > 1:
        if workspace is None:
            raise ValueError("split_k_linear: a tile with several splits needs a SplitWorkspace")
        workspace.reserve(tile.workspace_elements(rows, out_features), tiles)
        partials, arrivals = workspace.partials, workspace.arrivals
    else:
        partials = arrivals = output  # not read
    _split_k_linear_kernel[(tiles, tile.splits)](
        TensorDescriptor.from_tensor(hidden, [tile.block_m, tile.block_k]),
        TensorDescriptor.from_tensor(weight, [tile.block_n, tile.block_k]),
        output, partials, arrivals, rows, out_features, output.stride(0), in_features // tile.splits,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, SPLITS=tile.splits,
        PRECISION=dot_precision(hidden.dtype), UPCAST=interpreting(), num_warps=tile.num_warps,
        num_stages=tile.num_stages,
    )
    return output
