"""Small pieces shared by the attention kernels."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


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
