"""SwiGLU's ``silu(gate) * up`` in one pass over the fused gate/up GEMM output.

Eager PyTorch runs it as a silu over the gate half and a multiply (two launches,
the gate half written and read back); this reads each input once and writes the
product once. Arithmetic in float32, rounded once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from joule.kernels.common import cdiv, next_power_of_2, pdl_launch, wait_for_previous_grid


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr, output_ptr, stride_input, stride_output,
    INTERMEDIATE: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    wait_for_previous_grid(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    columns = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = columns < INTERMEDIATE
    gate = tl.load(gate_up_ptr + row * stride_input + columns, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_input + INTERMEDIATE + columns, mask=mask, other=0.0).to(tl.float32)
    activated = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(output_ptr + row * stride_output + columns, activated.to(output_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """``[T, 2I]`` (gate then up) -> ``silu(gate) * up`` ``[T, I]``."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"silu_and_mul: input must be [T, 2I] with contiguous rows, got {tuple(gate_up.shape)}")
    num_rows, width = gate_up.shape
    intermediate = width // 2
    output = torch.empty((num_rows, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if num_rows == 0:
        return output
    block = min(1024, next_power_of_2(intermediate))
    use_pdl = pdl_launch(gate_up.device)
    _silu_and_mul_kernel[(num_rows, cdiv(intermediate, block))](
        gate_up, output, gate_up.stride(0), output.stride(0),
        INTERMEDIATE=intermediate, BLOCK=block, USE_PDL=use_pdl, num_warps=4 if block >= 512 else 1,
        launch_pdl=use_pdl,
    )
    return output
