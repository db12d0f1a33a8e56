"""Small pieces shared by the attention kernels."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

try:  # Triton >= 3.4: grid dependency control for programmatic dependent launch
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: pdl_launch() is False, the jit branch is never taken
    gdc_launch_dependents = gdc_wait = None

LOG2_E = 1.4426950408889634


def next_power_of_2(value: int) -> int:
    """The smallest power of two >= ``value`` (0 for 0), on the host.

    Why not ``triton.next_power_of_2``: in recent Triton it and ``triton.cdiv`` are constexpr functions whose host
    calls unwrap their arguments through the compiler's machinery (~8 us each with triton 3.9); a kernel wrapper
    calls them several times a launch, an eager step ~1,000 times.
    """
    return 1 << (value - 1).bit_length() if value > 0 else 0


def cdiv(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded up, on the host (see ``next_power_of_2`` for why not Triton's)."""
    return -(-numerator // denominator)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs keep full precision (tf32 would cost ~3e-4 relative error)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1, whose tl.dot mishandles bf16 operands (seen with triton 3.9)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def tile_dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` with float32 accumulation; ``UPCAST`` widens operands first (interpreter only)."""
    if UPCAST:
        result = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        result = tl.dot(a, b, input_precision=PRECISION)
    return result


def pdl_launch(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with programmatic dependent launch (PDL).

    Why: a batch-1 decode step is ~180 small kernels; between two dependent kernels the GPU drains one grid
    before it starts the next (~1-2 us each, inside a CUDA graph too). With PDL the next grid's programs start
    while the previous one finishes and wait (``wait_for_previous_grid``) only before reading its results;
    the GEMV loads its first weights before that wait. Hopper (sm_90) and newer, never under the interpreter;
    ``JOULE_PDL=0`` turns it off (benchmarks compare both).
    """
    if device.type != "cuda" or interpreting() or gdc_wait is None:
        return False
    if os.environ.get("JOULE_PDL", "1") in ("0", "false", "off"):
        return False
    return device_capability(device) >= (9, 0)


def gemv_l2_prefetch_lines(use_pdl: bool, in_features: int, element_bytes: int) -> int:
    """128-byte lines per weight row a batch-1 GEMV program asks L2 for before its PDL wait (0: none).

    Why: between two dependent kernels of a batch-1 layer the memory bus idles for the hop (~2-4 us on an H200:
    docs/benchmarks.md (f)); a program already resident can start its whole weight slice towards L2 while it
    waits. Off until measured: ``JOULE_GEMV_L2_PREFETCH=1`` turns it on; only where the launch uses PDL
    (``use_pdl``, the caller's ``pdl_launch``), so never under the interpreter.
    """
    if not use_pdl or os.environ.get("JOULE_GEMV_L2_PREFETCH", "0") in ("", "0", "false", "off"):
        return 0
    return next_power_of_2(-(-in_features * element_bytes // 128))


def processor_count(device: torch.device) -> int:
    """The GPU's streaming multiprocessors (cached: kernels size their grids by it every launch); 4 off CUDA, where
    the interpreter runs a kernel's programs one after another."""
    if device.type != "cuda":
        return 4
    return _processor_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _processor_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_capability(device: torch.device) -> tuple[int, int]:
    """The CUDA device's compute capability (cached: the query is a driver call)."""
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@triton.jit
def _wait_then_let_next_launch(USE_PDL: tl.constexpr):
    """Under PDL: block until the previous kernel's writes are visible, then let the next kernel start.

    Every PDL-launched kernel calls this (as ``wait_for_previous_grid``) before it reads another kernel's output or
    writes anything (a buffer it writes may still be read by the previous kernel). Kernels before it in the stream
    are complete too, because each of them waited for its own predecessor before finishing.
    """
    if USE_PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def _let_next_launch_then_wait(USE_PDL: tl.constexpr):
    """``_wait_then_let_next_launch`` with the next kernel let in first: its programs load what does not depend on
    this kernel (a GEMV's weights) one kernel further ahead. Safe: a grid launches only once every program of the
    one before it has started, so the oldest waiting grid is always resident, and each wait still waits for the
    previous grid to complete."""
    if USE_PDL:
        gdc_launch_dependents()
        gdc_wait()


# Chosen once, when the kernels are defined: each kernel lets its successor launch before its own wait, the default
# since batch 1 on the H100 ran 938.9 against 907.0 tok/s with the successor let in after the wait
# (``JOULE_PDL_EARLY_TRIGGER=0``; docs/benchmarks.md, H100 2026-12-05 (g)). Two functions rather than a flag, so
# each choice compiles into kernels of its own in Triton's cache.
wait_for_previous_grid = (_wait_then_let_next_launch
                          if os.environ.get("JOULE_PDL_EARLY_TRIGGER", "1") in ("0", "false", "off")
                          else _let_next_launch_then_wait)


@triton.jit
def prefetch_l2(pointers, mask):
    """Ask for the cache lines at ``pointers`` (where ``mask``) in L2 without waiting or holding registers."""
    tl.inline_asm_elementwise(
        asm="""{
        .reg .pred p;
        setp.ne.b32 p, $2, 0;
        @p prefetch.global.L2 [$1];
        mov.b32 $0, 0;
        }""",
        constraints="=r,l,r", args=[pointers, mask.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1,
    )
