"""Markers shared by test files."""

import pytest
import torch

# Tests that run Triton kernels on CPU tensors: Triton's interpreter (TRITON_INTERPRET=1, which the test files set
# only where there is no CUDA) runs them; on a CUDA machine Triton would launch them on the GPU and refuse the CPU
# pointers. On a GPU the real replays are checked by benchmarks/gpu/graphs_check.py and engine_bench.py instead.
interpreted_triton_on_cpu = pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="runs Triton kernels on CPU tensors through the interpreter, which is off where CUDA is present")
