"""Row-wise argmax of the logits in two passes, for greedy decoding.

Why: torch reduces a row with one thread block, so a batch-1 step's argmax over a 128k
vocabulary runs on one SM (36 us on an H200, 3 % of a 1.1 ms step; profile in
docs/benchmarks.md). Here each row is cut into chunks reduced by their own programs,
then a second kernel picks the best chunk per row.

Ties go to the lowest index, as ``torch.argmax`` does: within a chunk by
``tl.max``'s left tie-break, across chunks by taking the first best chunk. The
reference is ``torch.argmax(logits, dim=-1)``; rows holding NaN are not supported
(torch would return the NaN's index).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import cdiv, next_power_of_2, pdl_launch, wait_for_previous_grid

CHUNK = 4096  # logits per program: 8 KB of bf16, ~32 programs per row of a 128k vocabulary


@triton.jit
def _chunk_argmax_kernel(logits_ptr, best_value_ptr, best_index_ptr, vocab_size, stride_row, num_chunks,
                         CHUNK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    columns = chunk * CHUNK + tl.arange(0, CHUNK)
    values = tl.load(logits_ptr + row.to(tl.int64) * stride_row + columns, mask=columns < vocab_size,
                     other=float("-inf")).to(tl.float32)
    best, index = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(best_value_ptr + row * num_chunks + chunk, best)
    tl.store(best_index_ptr + row * num_chunks + chunk, chunk * CHUNK + index)


@triton.jit
def _row_argmax_kernel(best_value_ptr, best_index_ptr, output_ptr, num_chunks, CHUNKS_PAD: tl.constexpr,
                       USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS_PAD)
    values = tl.load(best_value_ptr + row * num_chunks + chunks, mask=chunks < num_chunks, other=float("-inf"))
    _, best_chunk = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(output_ptr + row, tl.load(best_index_ptr + row * num_chunks + best_chunk))


def argmax_rows(logits: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """``logits.argmax(dim=-1)`` for a 2-D ``[rows, vocab]`` tensor with contiguous rows (int64 result)."""
    num_chunks = checked_chunks("argmax_rows", logits, chunk)
    rows, vocab_size = logits.shape
    output = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return output
    best_values, best_indices = chunk_buffers(rows, num_chunks, logits.device)
    use_pdl = pdl_launch(logits.device)
    _chunk_argmax_kernel[(rows, num_chunks)](logits, best_values, best_indices, vocab_size, logits.stride(0),
                                             num_chunks, CHUNK=chunk, USE_PDL=use_pdl, num_warps=4,
                                             launch_pdl=use_pdl)
    return pick_best_chunks(best_values, best_indices, output, use_pdl)


def checked_chunks(caller: str, logits: torch.Tensor, chunk: int) -> int:
    """Chunks per row of a two-pass reduction over ``logits``, after checking what its kernels assume."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"{caller}: logits must be [rows, vocab] with contiguous rows, got {tuple(logits.shape)}")
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"{caller}: chunk must be a power of two >= 16, got {chunk}")
    if logits.shape[0] and not logits.shape[1]:
        raise ValueError(f"{caller}: the vocabulary is empty")
    return cdiv(logits.shape[1], chunk)


def chunk_buffers(rows: int, num_chunks: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each chunk's best value and its column: what a first pass writes and ``pick_best_chunks`` reads."""
    return (torch.empty((rows, num_chunks), dtype=torch.float32, device=device),
            torch.empty((rows, num_chunks), dtype=torch.int64, device=device))


def pick_best_chunks(best_values: torch.Tensor, best_indices: torch.Tensor, output: torch.Tensor,
                     use_pdl: bool) -> torch.Tensor:
    """The second pass: each row's column of its first best chunk, into ``output``."""
    rows, num_chunks = best_values.shape
    _row_argmax_kernel[(rows,)](best_values, best_indices, output, num_chunks,
                                CHUNKS_PAD=max(16, next_power_of_2(num_chunks)), USE_PDL=use_pdl,
                                num_warps=1, launch_pdl=use_pdl)
    return output
