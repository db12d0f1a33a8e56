"""Weights of the next kernels asked of L2 by a kernel that leaves the memory bus idle (batch-1 decode attention).

Why: a batch-1 decode layer on an H100 is a chain of dependent kernels; decode attention and its split merge read
~0.5 MB of KV over ~6.8 us, time in which the bus could have streamed ~20 MB, while the o projection and the gate/up
GEMV that follow pay 2.8-2.9 us each beyond their weight bytes for the hop (docs/benchmarks.md, H100 2026-12-05 (f)).
The attention programs ask L2 for the o projection's weight and the head of the gate/up weight (the rows its first
programs read) with Hopper's bulk prefetch, one instruction per thread and range, before their PDL wait: nothing
waits for it and no register holds it. A failed or evicted prefetch costs only bandwidth; results never change.

``JOULE_L2_WARM_MB`` turns it on (unset: off until measured): the megabytes of gate/up rows to warm beside the
whole o weight (0: the o weight only).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from joule.kernels.common import device_capability, interpreting

WARM_ENV = "JOULE_L2_WARM_MB"
MAX_RANGES = 3


@dataclass(frozen=True)
class WarmRange:
    """``num_bytes`` from the start of ``tensor``'s storage view (a multiple of 16; the view starts aligned)."""

    tensor: torch.Tensor
    num_bytes: int


def warm_gate_up_bytes() -> int | None:
    """Bytes of gate/up rows to warm (None: warming off), from ``JOULE_L2_WARM_MB``."""
    value = os.environ.get(WARM_ENV, "")
    if value in ("", "off"):
        return None
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"{WARM_ENV} must be a number of megabytes or 'off', got {value!r}") from None
    if megabytes < 0:
        raise ValueError(f"{WARM_ENV} must be >= 0, got {value!r}")
    return int(megabytes * (1 << 20))


def decode_layer_warm_ranges(output_weight: torch.Tensor, gate_up_weight: torch.Tensor,
                             gate_up_bytes: int) -> tuple[WarmRange, ...]:
    """The whole o projection weight, then ``gate_up_bytes`` split between the first gate rows and the first up rows
    (the gated GEMV's program ``p`` reads gate rows ``[b p, b (p + 1))`` and the up rows ``N`` below them)."""
    ranges = [WarmRange(output_weight, _whole_lines(output_weight.numel() * output_weight.element_size()))]
    half = gate_up_weight.shape[0] // 2
    row_bytes = gate_up_weight.stride(0) * gate_up_weight.element_size()
    rows = min(half, gate_up_bytes // 2 // max(1, row_bytes))
    if rows > 0:
        ranges.append(WarmRange(gate_up_weight, _whole_lines(rows * row_bytes)))
        ranges.append(WarmRange(gate_up_weight[half:], _whole_lines(rows * row_bytes)))
    return tuple(ranges)


def _whole_lines(num_bytes: int) -> int:
    return num_bytes // 16 * 16


def bulk_prefetch_available(device: torch.device) -> bool:
    """Hopper's ``cp.async.bulk.prefetch.L2`` (sm_90 and newer); never under the interpreter."""
    return device.type == "cuda" and not interpreting() and device_capability(device) >= (9, 0)


def warm_arguments(ranges: tuple[WarmRange, ...], fallback: torch.Tensor) -> list:
    """Pointer and byte count of each of MAX_RANGES ranges for ``warm_l2`` (unused slots: ``fallback``, 0 bytes)."""
    if len(ranges) > MAX_RANGES:
        raise ValueError(f"warm_arguments: at most {MAX_RANGES} ranges, got {len(ranges)}")
    arguments = []
    for index in range(MAX_RANGES):
        if index < len(ranges):
            arguments += [ranges[index].tensor, ranges[index].num_bytes]
        else:
            arguments += [fallback, 0]
    return arguments


@triton.jit
def _bulk_prefetch_l2(pointers, sizes):
    """``cp.async.bulk.prefetch.L2`` of ``sizes`` bytes (multiples of 16; <= 0: nothing) at each 16-byte-aligned
    pointer."""
    tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        setp.gt.s32 p, $2, 0;
        @p cp.async.bulk.prefetch.L2.global [$1], $2;
        mov.b32 $0, 0;
        }""",
        constraints="=r,l,r", args=[pointers, sizes], dtype=tl.int32, is_pure=False, pack=1,
    )


@triton.jit
def _warm_range(base_ptr, num_bytes, worker, num_workers):
    chunk = tl.cdiv(tl.cdiv(num_bytes, num_workers), 16) * 16
    start = worker.to(tl.int64) * chunk
    size = tl.minimum(chunk, num_bytes - start)
    _bulk_prefetch_l2(base_ptr.to(tl.pointer_type(tl.uint8)) + start, size.to(tl.int32))


@triton.jit
def warm_l2(first_ptr, first_bytes, second_ptr, second_bytes, third_ptr, third_bytes, program, num_programs,
            LANES: tl.constexpr):
    """Program ``program`` of ``num_programs`` asks L2 for its share of up to three byte ranges, one bulk prefetch
    per thread and range (LANES: the program's thread count, so no thread repeats another's range)."""
    worker = program * LANES + tl.arange(0, LANES)
    num_workers = num_programs * LANES
    _warm_range(first_ptr, first_bytes, worker, num_workers)
    _warm_range(second_ptr, second_bytes, worker, num_workers)
    _warm_range(third_ptr, third_bytes, worker, num_workers)
