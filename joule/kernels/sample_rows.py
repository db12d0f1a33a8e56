"""Temperature sampling and greedy rows in two launches: the exponential race fused into the two-pass argmax.

Why: a sampled row through torch takes ~10 launches a step (a float32 copy of the logits, the division by the
temperature, the uniform draw, five in-place passes turning it into log-exponential noise, the subtraction) and then
torch's argmax, which reduces a row on one SM (36 us of a batch-1 step over a 128k vocabulary, docs/benchmarks.md).
A batch-1 step sampled at T=0.8 ran 1.168 ms against greedy's 0.995 on an H100 (2026-12-06 (l), call 1). Here each
program reads a chunk of a row once, draws its noise with Philox (``tl.rand``, keyed on the row's 64-bit seed and the
column) and keeps the chunk's best score; ``argmax.py``'s second pass picks each row's best chunk.

The race is the sampler's: ``argmax(logits / T - log(E))`` with ``E = -log(U)`` exponential. A greedy row (noise off,
1/T = 1) is the plain argmax, ties to the lowest index. The noise is Philox's, not torch's generator's: tokens for a
given seed differ from the torch path's (both are exact samples), and a row's noise depends on its seed alone, not on
the batch. Filters (top-k, top-p, min-p) are not here: rows that ask for them take the torch path.
The reference is ``reference_sample_rows`` (the same race with the uniforms given).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.argmax import CHUNK, checked_chunks, chunk_buffers, pick_best_chunks
from joule.kernels.common import cdiv, pdl_launch, wait_for_previous_grid

_TINY = 1.1754943508222875e-38  # float32's smallest normal: keeps log() finite


@triton.jit
def _chunk_race_kernel(logits_ptr, seeds_ptr, inverse_temperatures_ptr, noise_on_ptr, best_value_ptr,
                       best_index_ptr, vocab_size, stride_row, num_chunks, CHUNK: tl.constexpr,
                       USE_PDL: tl.constexpr):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    columns = chunk * CHUNK + tl.arange(0, CHUNK)
    valid = columns < vocab_size
    values = tl.load(logits_ptr + row.to(tl.int64) * stride_row + columns, mask=valid,
                     other=float("-inf")).to(tl.float32)
    scores = values * tl.load(inverse_temperatures_ptr + row)
    if tl.load(noise_on_ptr + row) != 0:
        uniform = tl.maximum(tl.rand(tl.load(seeds_ptr + row), columns), 1.1754943508222875e-38)
        exponential = tl.maximum(-tl.log(uniform), 1.1754943508222875e-38)
        scores = scores - tl.log(exponential)
    scores = tl.where(valid, scores, float("-inf"))
    best, index = tl.max(scores, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(best_value_ptr + row * num_chunks + chunk, best)
    tl.store(best_index_ptr + row * num_chunks + chunk, chunk * CHUNK + index)


@triton.jit
def _uniforms_kernel(seeds_ptr, output_ptr, vocab_size, CHUNK: tl.constexpr):
    row = tl.program_id(0)
    columns = tl.program_id(1) * CHUNK + tl.arange(0, CHUNK)
    tl.store(output_ptr + row.to(tl.int64) * vocab_size + columns, tl.rand(tl.load(seeds_ptr + row), columns),
             mask=columns < vocab_size)


def draw_uniforms(seeds: torch.Tensor, vocab_size: int, chunk: int = 1024) -> torch.Tensor:
    """The ``[rows, vocab]`` uniforms ``sample_rows`` draws for these seeds (for checks against the reference)."""
    output = torch.empty((seeds.shape[0], vocab_size), dtype=torch.float32, device=seeds.device)
    _uniforms_kernel[(seeds.shape[0], cdiv(vocab_size, chunk))](seeds, output, vocab_size, CHUNK=chunk)
    return output


def signed_seeds(seeds: list[int]) -> list[int]:
    """64-bit unsigned seeds as int64 values with the same bits (what an int64 tensor can hold)."""
    return [seed - (1 << 64) if seed >= 1 << 63 else seed for seed in seeds]


def sample_rows(logits: torch.Tensor, seeds: torch.Tensor, inverse_temperatures: torch.Tensor,
                noise_on: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    """Each row's token (int64): ``argmax(logits * inverse_temperature - noise_on * log(E))``, ``E`` drawn from the
    row's seed. ``seeds`` int64 (``signed_seeds``), ``inverse_temperatures`` float32, ``noise_on`` int32; one per row,
    on the logits' device."""
    num_chunks = checked_chunks("sample_rows", logits, chunk)
    rows, vocab_size = logits.shape
    for name, tensor, dtype in (("seeds", seeds, torch.int64), ("inverse_temperatures", inverse_temperatures,
                                                                torch.float32), ("noise_on", noise_on, torch.int32)):
        if tensor.shape != (rows,) or tensor.dtype != dtype or tensor.device != logits.device:
            raise ValueError(f"sample_rows: {name} must be {dtype} of shape ({rows},) on {logits.device}, got "
                             f"{tensor.dtype} {tuple(tensor.shape)} on {tensor.device}")
    output = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return output
    best_values, best_indices = chunk_buffers(rows, num_chunks, logits.device)
    use_pdl = pdl_launch(logits.device)
    _chunk_race_kernel[(rows, num_chunks)](logits, seeds, inverse_temperatures, noise_on, best_values, best_indices,
                                           vocab_size, logits.stride(0), num_chunks, CHUNK=chunk, USE_PDL=use_pdl,
                                           num_warps=4, launch_pdl=use_pdl)
    return pick_best_chunks(best_values, best_indices, output, use_pdl)


def reference_sample_rows(logits: torch.Tensor, uniforms: torch.Tensor, inverse_temperatures: torch.Tensor,
                          noise_on: torch.Tensor) -> torch.Tensor:
    """The race in torch with the uniforms given (``[rows, vocab]``): what the kernel computes from its own draws."""
    uniform = uniforms.float().clamp(min=_TINY)
    noise = (-uniform.log()).clamp(min=_TINY).log()
    scores = logits.float() * inverse_temperatures.unsqueeze(1) - noise * (noise_on != 0).unsqueeze(1)
    return scores.max(dim=-1).indices
