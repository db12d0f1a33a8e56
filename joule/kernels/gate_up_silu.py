"""The MLP's gate/up projection with SiLU-and-mul in its epilogue, operands through TMA descriptors.

Why: a ~8k-token prompt step's layer on the H100 spends ~137 us in SiLU-and-mul after cuBLAS's gate/up GEMM
(~790 us), reading the GEMM's [T, 2I] output back from DRAM and writing [T, I] (docs/benchmarks.md, 2026-12-05 (f)):
~4.6 % of workload 3. A first fused GEMM with pointer loads lost 8.4 % end to end (2026-12-06 (h)): it ran far
below cuBLAS. This one loads its tiles through tensor-memory-accelerator descriptors (asynchronous bulk copies on
sm_90, the path Triton's fast Hopper GEMMs take) and can run persistently: on the H100 it beat cuBLAS + SiLU-and-mul
at 2k-8k rows (``benchmarks/gpu/gate_up_silu_sweep.py``, 2026-12-06 (j)); the tiles and the switch are in
``gate_up_config``.
How: each tile of the [T, I] output takes the gate rows ``n`` and the up rows ``I + n`` of the merged [2I, K] weight
(the engine's layout) into two float32 accumulators (a stacked tile, the default since 2026-12-06 (q), loads both as
one [2, N, K] box and runs one 256-column product a step, split at the epilogue); the projections are rounded to the
activation dtype before the SiLU, as the unfused path rounds them; tiles are walked GROUP_M row blocks per column
block so neighbours share weight tiles in L2. ``tma_linear`` is the same GEMM without the epilogue, for sweeps
against cuBLAS.
"""

from __future__ import annotations

import re

import torch
import triton
import triton.language as tl

from joule.kernels.common import cdiv, dot_precision, interpreting, processor_count
from joule.kernels.gate_up_config import DEFAULT_TILE, GateUpTile


ELEMENT_TYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _tile_origin(tile, row_blocks, column_blocks, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """First row and column of output tile ``tile``, walked GROUP_M row blocks per column block."""
    per_group = GROUP_M * column_blocks
    first_row_block = (tile // per_group) * GROUP_M
    group_rows = tl.minimum(row_blocks - first_row_block, GROUP_M)
    return (first_row_block + (tile % per_group) % group_rows) * BLOCK_M, ((tile % per_group) // group_rows) * BLOCK_N


@triton.jit
def _store_silu_product(output_descriptor, row, column, gate_sum, up_sum, ELEMENT: tl.constexpr):
    """``silu(gate) * up`` of one tile, both projections rounded to the activation dtype first, as the unfused path
    rounds its GEMM's output before ``silu_and_mul``."""
    gate_value = gate_sum.to(ELEMENT).to(tl.float32)
    up_value = up_sum.to(ELEMENT).to(tl.float32)
    output_descriptor.store([row, column], (gate_value / (1.0 + tl.exp(-gate_value)) * up_value).to(ELEMENT))


@triton.jit
def _gate_up_silu_tiles(x_descriptor, weight_descriptor, output_descriptor, rows, intermediate, hidden, num_programs,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                        ELEMENT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLATTEN: tl.constexpr):
    row_blocks = tl.cdiv(rows, BLOCK_M)
    column_blocks = tl.cdiv(intermediate, BLOCK_N)
    for tile in tl.range(tl.program_id(0), row_blocks * column_blocks, num_programs, flatten=FLATTEN):
        row, column = _tile_origin(tile, row_blocks, column_blocks, BLOCK_M, BLOCK_N, GROUP_M)
        gate_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        up_sum = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for inner in range(0, hidden, BLOCK_K):
            x = x_descriptor.load([row, inner])
            gate = weight_descriptor.load([column, inner])
            up = weight_descriptor.load([intermediate + column, inner])
            if UPCAST:  # the interpreter's tl.dot mishandles 16-bit operands
                gate_sum += tl.dot(x.to(tl.float32), gate.to(tl.float32).T, input_precision="ieee")
                up_sum += tl.dot(x.to(tl.float32), up.to(tl.float32).T, input_precision="ieee")
            else:
                gate_sum = tl.dot(x, gate.T, gate_sum, input_precision=PRECISION)
                up_sum = tl.dot(x, up.T, up_sum, input_precision=PRECISION)
        # Columns past ``intermediate`` (a last partial tile) read up rows as gate rows; the store clips them.
        _store_silu_product(output_descriptor, row, column, gate_sum, up_sum, ELEMENT)


# One binary for every step length: a new rows % 16 pattern would be a ~2 s compile inside a step.
@triton.jit(do_not_specialize=["rows", "num_programs"])
def _gate_up_silu_kernel(x_descriptor, weight_descriptor, output_descriptor, rows, intermediate, hidden,
                         num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         GROUP_M: tl.constexpr, ELEMENT: tl.constexpr, PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr, FLATTEN: tl.constexpr):
    _gate_up_silu_tiles(x_descriptor, weight_descriptor, output_descriptor, rows, intermediate, hidden, num_programs,
                        BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, ELEMENT, PRECISION, UPCAST, FLATTEN)


@triton.jit
def _device_descriptors(x_ptr, output_ptr, rows, columns, hidden, stride_x, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The input's and the output's descriptors, made by the kernel: Hopper's warp specialization splits a tile's rows
    between two consumer warpgroups and rewrites the loads' block shapes, which it can do only for descriptors it
    creates."""
    x_descriptor = tl.make_tensor_descriptor(x_ptr, shape=[rows, hidden], strides=[stride_x, 1],
                                             block_shape=[BLOCK_M, BLOCK_K])
    output_descriptor = tl.make_tensor_descriptor(output_ptr, shape=[rows, columns], strides=[columns, 1],
                                                  block_shape=[BLOCK_M, BLOCK_N])
    return x_descriptor, output_descriptor


@triton.jit
def _stacked_gate_up_silu_tiles(x_descriptor, stacked_descriptor, output_descriptor, rows, intermediate, hidden,
                                num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                GROUP_M: tl.constexpr, ELEMENT: tl.constexpr, PRECISION: tl.constexpr,
                                UPCAST: tl.constexpr, FLATTEN: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """Each step loads the gate and the up tile as one [2, BLOCK_N, BLOCK_K] box of the weight seen as [2, I, K] and
    multiplies once into a [BLOCK_M, 2 * BLOCK_N] accumulator, split at the epilogue: the input tile is read once a
    step, not once per product. The warp-specialized walk always takes this form: with two products a step
    (``_gate_up_silu_tiles``), Triton 3.6's Hopper warp specialization returned NaNs at three or more pipeline stages
    on the H100 and the H200 (2026-12-06 (p)); two stages were exact but slower."""
    row_blocks = tl.cdiv(rows, BLOCK_M)
    column_blocks = tl.cdiv(intermediate, BLOCK_N)
    for tile in tl.range(tl.program_id(0), row_blocks * column_blocks, num_programs, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        row, column = _tile_origin(tile, row_blocks, column_blocks, BLOCK_M, BLOCK_N, GROUP_M)
        both_sum = tl.zeros([BLOCK_M, 2 * BLOCK_N], tl.float32)
        for inner in range(0, hidden, BLOCK_K):
            x = x_descriptor.load([row, inner])
            both = stacked_descriptor.load([0, column, inner]).reshape(2 * BLOCK_N, BLOCK_K)
            if UPCAST:  # the interpreter's tl.dot mishandles 16-bit operands
                both_sum += tl.dot(x.to(tl.float32), both.to(tl.float32).T, input_precision="ieee")
            else:
                both_sum = tl.dot(x, both.T, both_sum, input_precision=PRECISION)
        gate_sum, up_sum = both_sum.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
        _store_silu_product(output_descriptor, row, column, gate_sum, up_sum, ELEMENT)


@triton.jit(do_not_specialize=["rows", "num_programs"])
def _gate_up_silu_specialized_kernel(x_ptr, weight_ptr, output_ptr, rows, intermediate, hidden, stride_x,
                                     stride_weight, num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ELEMENT: tl.constexpr,
                                     PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLATTEN: tl.constexpr):
    """The same tiles with a producer warpgroup feeding two consumer warpgroups (``tl.range(warp_specialize=True)``),
    the structure of cuBLAS's Hopper GEMMs."""
    x_descriptor, output_descriptor = _device_descriptors(x_ptr, output_ptr, rows, intermediate, hidden, stride_x,
                                                          BLOCK_M, BLOCK_N, BLOCK_K)
    stacked_descriptor = tl.make_tensor_descriptor(
        weight_ptr, shape=[2, intermediate, hidden], strides=[intermediate * stride_weight, stride_weight, 1],
        block_shape=[2, BLOCK_N, BLOCK_K])
    _stacked_gate_up_silu_tiles(x_descriptor, stacked_descriptor, output_descriptor, rows, intermediate, hidden,
                                num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, ELEMENT, PRECISION, UPCAST, FLATTEN,
                                True)


@triton.jit(do_not_specialize=["rows", "num_programs"])
def _gate_up_silu_stacked_kernel(x_descriptor, stacked_descriptor, output_descriptor, rows, intermediate, hidden,
                                 num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 GROUP_M: tl.constexpr, ELEMENT: tl.constexpr, PRECISION: tl.constexpr,
                                 UPCAST: tl.constexpr, FLATTEN: tl.constexpr):
    _stacked_gate_up_silu_tiles(x_descriptor, stacked_descriptor, output_descriptor, rows, intermediate, hidden,
                                num_programs, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, ELEMENT, PRECISION, UPCAST, FLATTEN,
                                False)


def _check_operands(hidden: torch.Tensor, weight: torch.Tensor, caller: str, gated: bool) -> tuple[int, int]:
    """Rows and output columns; a bad operand raises, named. ``gated``: a merged [2I, K] gate/up weight."""
    if hidden.dim() != 2 or hidden.stride(1) != 1:
        raise ValueError(f"{caller}: hidden must be [T, K] with contiguous rows, got {tuple(hidden.shape)}")
    rows, hidden_size = hidden.shape
    if (weight.dim() != 2 or weight.shape[1] != hidden_size or weight.stride(1) != 1
            or (gated and weight.shape[0] % 2)):
        layout = "[2I, K] (gate rows over up rows)" if gated else "[N, K]"
        raise ValueError(f"{caller}: weight {tuple(weight.shape)} must be {layout} with K = {hidden_size} and "
                         "contiguous rows")
    if weight.dtype != hidden.dtype or hidden.dtype not in ELEMENT_TYPES:
        raise ValueError(f"{caller}: weight dtype {weight.dtype} and hidden's {hidden.dtype} must be one of "
                         "bfloat16, float16, float32, alike")
    columns = weight.shape[0] // 2 if gated else weight.shape[0]
    if any((stride * hidden.element_size()) % 16 for stride in (hidden.stride(0), weight.stride(0), columns)):
        raise ValueError(f"{caller}: row strides must be multiples of 16 bytes (tensor-memory descriptors)")
    return rows, columns


def _triton_version() -> tuple[int, int]:
    """(major, minor) of the installed Triton: warp specialization is refused where it was measured broken."""
    major, minor = (re.match(r"\d*", part).group() or "0" for part in (triton.__version__.split(".") + ["0"])[:2])
    return int(major), int(minor)


def _descriptor_workspace(size: int, alignment: int, stream) -> torch.Tensor:
    """Global memory for the descriptors a warp-specialized kernel writes at launch (Triton asks per launch)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _launch(kernels: tuple, hidden: torch.Tensor, weight: torch.Tensor, tile: GateUpTile | None,
            max_programs: int | None, caller: str, gated: bool) -> torch.Tensor:
    """Check the operands, then run the plain kernel over host descriptors (with ``tile.stacked`` the stacked one,
    with ``tile.warp_specialize`` the specialized one, which makes its own) and a new output: one program per tile,
    or a persistent tile's programs (one per processor, or ``max_programs``). ``kernels``: (plain, stacked or None,
    specialized)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    rows, columns = _check_operands(hidden, weight, caller, gated)
    output = torch.empty((rows, columns), dtype=hidden.dtype, device=hidden.device)
    if rows == 0:
        return output
    if max_programs is not None and max_programs < 1:
        raise ValueError(f"{caller}: max_programs must be at least 1, got {max_programs}")
    tile = tile or DEFAULT_TILE
    tiles = cdiv(rows, tile.block_m) * cdiv(columns, tile.block_n)
    programs = min(tiles, max_programs or processor_count(hidden.device)) if tile.persistent else tiles
    constants = dict(BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, GROUP_M=tile.group_m,
                     ELEMENT=ELEMENT_TYPES[hidden.dtype], PRECISION=dot_precision(hidden.dtype),
                     UPCAST=interpreting(), FLATTEN=tile.flatten and tile.persistent, num_warps=tile.num_warps,
                     num_stages=tile.num_stages)
    plain, stacked, specialized = kernels
    if tile.warp_specialize and gated and _triton_version() < (3, 7):
        raise ValueError(f"{caller}: warp-specialized gate/up tiles need Triton 3.7 or later, this is "
                         f"{triton.__version__}: 3.6's pipeline gave NaNs with two products a step and failed to "
                         f"compile the stacked one (H100/H200, 2026-12-06 (p), (q)); set JOULE_FUSED_GATE_UP to a "
                         f"tile without warp specialization")
    if tile.warp_specialize:
        triton.set_allocator(_descriptor_workspace)  # a context variable: set on the launching thread
        specialized[(programs,)](hidden, weight, output, rows, columns, hidden.shape[1], hidden.stride(0),
                                 weight.stride(0), programs, **constants)
        return output
    x_descriptor = TensorDescriptor.from_tensor(hidden, [tile.block_m, tile.block_k])
    output_descriptor = TensorDescriptor.from_tensor(output, [tile.block_m, tile.block_n])
    if tile.stacked and stacked is not None:  # the merged weight as [2, I, K]: gate and up tiles in one box
        if not weight.is_contiguous():
            raise ValueError(f"{caller}: a stacked tile needs a contiguous weight")
        weight_descriptor = TensorDescriptor.from_tensor(weight.view(2, columns, weight.shape[1]),
                                                         [2, tile.block_n, tile.block_k])
        stacked[(programs,)](x_descriptor, weight_descriptor, output_descriptor, rows, columns, hidden.shape[1],
                             programs, **constants)
        return output
    plain[(programs,)](x_descriptor, TensorDescriptor.from_tensor(weight, [tile.block_n, tile.block_k]),
                       output_descriptor, rows, columns, hidden.shape[1], programs, **constants)
    return output


def gate_up_silu(hidden: torch.Tensor, weight: torch.Tensor, tile: GateUpTile | None = None,
                 max_programs: int | None = None) -> torch.Tensor:
    """``silu(hidden @ weight[:I].T) * (hidden @ weight[I:].T)`` for a merged ``[2I, K]`` weight, ``[T, I]``.

    ``max_programs``: a persistent tile's programs (default one per processor); fewer leave processors free for a
    kernel running beside it on another stream (``benchmarks/gpu/overlap_probe.py --partition``)."""
    return _launch((_gate_up_silu_kernel, _gate_up_silu_stacked_kernel, _gate_up_silu_specialized_kernel), hidden,
                   weight, tile, max_programs, "gate_up_silu", gated=True)


@triton.jit
def _linear_tiles(x_descriptor, weight_descriptor, output_descriptor, rows, out_features, hidden, num_programs,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                  ELEMENT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLATTEN: tl.constexpr,
                  WARP_SPECIALIZE: tl.constexpr):
    row_blocks = tl.cdiv(rows, BLOCK_M)
    column_blocks = tl.cdiv(out_features, BLOCK_N)
    for tile in tl.range(tl.program_id(0), row_blocks * column_blocks, num_programs, flatten=FLATTEN,
                         warp_specialize=WARP_SPECIALIZE):
        row, column = _tile_origin(tile, row_blocks, column_blocks, BLOCK_M, BLOCK_N, GROUP_M)
        total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for inner in range(0, hidden, BLOCK_K):
            x = x_descriptor.load([row, inner])
            weight = weight_descriptor.load([column, inner])
            if UPCAST:
                total += tl.dot(x.to(tl.float32), weight.to(tl.float32).T, input_precision="ieee")
            else:
                total = tl.dot(x, weight.T, total, input_precision=PRECISION)
        output_descriptor.store([row, column], total.to(ELEMENT))


@triton.jit(do_not_specialize=["rows", "num_programs"])
def _linear_kernel(x_descriptor, weight_descriptor, output_descriptor, rows, out_features, hidden, num_programs,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
                   ELEMENT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, FLATTEN: tl.constexpr):
    _linear_tiles(x_descriptor, weight_descriptor, output_descriptor, rows, out_features, hidden, num_programs,
                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, ELEMENT, PRECISION, UPCAST, FLATTEN, False)


@triton.jit(do_not_specialize=["rows", "num_programs"])
def _linear_specialized_kernel(x_ptr, weight_ptr, output_ptr, rows, out_features, hidden, stride_x, stride_weight,
                               num_programs, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                               GROUP_M: tl.constexpr, ELEMENT: tl.constexpr, PRECISION: tl.constexpr,
                               UPCAST: tl.constexpr, FLATTEN: tl.constexpr):
    x_descriptor, output_descriptor = _device_descriptors(x_ptr, output_ptr, rows, out_features, hidden, stride_x,
                                                          BLOCK_M, BLOCK_N, BLOCK_K)
    weight_descriptor = tl.make_tensor_descriptor(weight_ptr, shape=[out_features, hidden], strides=[stride_weight, 1],
                                                  block_shape=[BLOCK_N, BLOCK_K])
    _linear_tiles(x_descriptor, weight_descriptor, output_descriptor, rows, out_features, hidden, num_programs,
                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, ELEMENT, PRECISION, UPCAST, FLATTEN, True)


def tma_linear(hidden: torch.Tensor, weight: torch.Tensor, tile: GateUpTile | None = None,
               max_programs: int | None = None) -> torch.Tensor:
    """``hidden @ weight.T`` (``[T, K]`` by ``[N, K]``) through the same TMA-fed, optionally persistent tiles.

    Not used by the engine: the projections without an epilogue stay on cuBLAS unless this measures faster
    (``gate_up_silu_sweep.py --plain``); a persistent version of every prompt-step GEMM is also what running them on
    part of the processors beside decode work would need (``overlap_probe.py --partition``)."""
    return _launch((_linear_kernel, None, _linear_specialized_kernel), hidden, weight, tile, max_programs,
                   "tma_linear", gated=False)
