"""Many calls of one function captured in one CUDA graph: how start-up tuning and calibration time GPU work.

Why a graph: the engine's decode steps and prompt chunks replay CUDA graphs, so an operation there costs its kernel
time, not an eager launch (~20 us of host work, more than a small GEMM's kernel). Timing eager calls made every
decode-sized GEMM look launch-bound (``joule/perf/calibrate.py``) and would hide a kernel whose host wrapper is slow.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def repeated_graph(function: Callable[[], object], calls: int) -> torch.cuda.CUDAGraph:
    """``calls`` calls of ``function`` in one CUDA graph, after a warm-up call on a side stream (cuBLAS picks its
    kernel and workspace, Triton compiles, lazily made state stays outside the capture)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        function()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            function()
    return graph
