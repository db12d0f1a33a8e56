"""A decode graph's inputs in one kernel: pinned host words copied to the device, the continued tokens laid over.

Why: between two batch-1 decode graphs the step's inputs went up as a host-to-device copy, then the tokens the
last step sampled on the device as a device-to-device copy. Each copy-engine operation cost the critical path
its own ~1-3 us plus a ~2-6 us gap after the kernel before it (H100, ``step_gaps.py b1``, 2026-12-06 (i)): ~12 us
of a ~1.07 ms step. A kernel reads the pinned buffer directly (it is mapped into the GPU's address space) and
starts under programmatic dependent launch like the kernels around it.

How: the inputs are 32-bit words in ``segments`` (start, length) of one packed buffer; program (i, s) copies
words ``i * BLOCK ..`` of segment s. The first ``2 * num_tokens`` words (the first ``num_tokens`` int64 input
ids) come from ``tokens`` instead, when given. The host reads are issued before the PDL wait, so they overlap the
kernel before; the tokens and every store wait for it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import cdiv, pdl_launch, wait_for_previous_grid

BLOCK = 1024
SEGMENTS = 4


@triton.jit
def _segment(segment, first, second, third, fourth):
    """The ``segment``-th of four scalar arguments (a program's segment start or length)."""
    return tl.where(segment == 0, first, tl.where(segment == 1, second, tl.where(segment == 2, third, fourth)))


@triton.jit
def _graph_feed_kernel(host_ptr, device_ptr, tokens_ptr, token_words,
                       start0, start1, start2, start3, length0, length1, length2, length3,
                       HAS_TOKENS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    segment = tl.program_id(1)
    start = _segment(segment, start0, start1, start2, start3)
    length = _segment(segment, length0, length1, length2, length3)
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < length
    words = start + offsets
    values = tl.load(host_ptr + words, mask=inside, other=0)
    wait_for_previous_grid(USE_PDL)
    if HAS_TOKENS:
        is_token = inside & (words < token_words)
        values = tl.where(is_token, tl.load(tokens_ptr + words, mask=is_token, other=0), values)
    tl.store(device_ptr + words, values, mask=inside)


def feed_graph_inputs(host_words: torch.Tensor, device_words: torch.Tensor, segments: list[tuple[int, int]],
                      tokens: torch.Tensor | None = None) -> None:
    """Copy ``host_words[start : start + length]`` to ``device_words`` for each (start, length) of ``segments``
    (at most four, in int32 words), the first ``len(tokens)`` int64 values of the buffer taken from ``tokens``.

    ``host_words``: int32, pinned on CUDA (any CPU tensor under the interpreter); ``device_words`` the same length;
    ``tokens``: contiguous int64 on the device, or None.
    """
    if host_words.dtype != torch.int32 or device_words.dtype != torch.int32 or host_words.shape != device_words.shape:
        raise ValueError(f"feed_graph_inputs: host and device words must be int32 of one shape, got "
                         f"{host_words.dtype} {tuple(host_words.shape)} and {device_words.dtype} "
                         f"{tuple(device_words.shape)}")
    if not 1 <= len(segments) <= SEGMENTS or any(start < 0 or length < 0 or start + length > host_words.numel()
                                                 for start, length in segments):
        raise ValueError(f"feed_graph_inputs: 1-{SEGMENTS} segments inside {host_words.numel()} words, got {segments}")
    if tokens is not None and (tokens.dtype != torch.int64 or not tokens.is_contiguous()):
        raise ValueError(f"feed_graph_inputs: tokens must be contiguous int64, got {tokens.dtype}")
    padded = list(segments) + [(0, 0)] * (SEGMENTS - len(segments))
    longest = max(length for _, length in padded)
    if longest == 0:
        return
    use_pdl = pdl_launch(device_words.device)
    token_words = 0 if tokens is None else 2 * tokens.numel()
    _graph_feed_kernel[(cdiv(longest, BLOCK), SEGMENTS)](
        host_words, device_words, tokens.view(torch.int32) if tokens is not None else device_words, token_words,
        *(start for start, _ in padded), *(length for _, length in padded),
        HAS_TOKENS=tokens is not None, BLOCK=BLOCK, USE_PDL=use_pdl, num_warps=4, launch_pdl=use_pdl)
