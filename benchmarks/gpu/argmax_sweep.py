"""Greedy argmax over the logits: the two-pass Triton kernel (``joule/kernels/argmax.py``) against ``torch.argmax``,
device time (CUDA graph of 20 calls) and host time per launch (the decode step's host work sets workload 3's pace on
slower hosts: H100, 2026-12-06 (k)).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/argmax_sweep.py [out.json]
Llama-3.2-1B's vocabulary (128,256), bf16 logits, 1-256 rows.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_sweep import graph_ms  # noqa: E402

from joule.kernels.argmax import argmax_rows  # noqa: E402
from joule.perf.json_files import write_json  # noqa: E402

VOCAB = 128256


def host_us(function, calls: int = 200) -> float:
    """Median host microseconds per launch, the GPU kept busy so no launch waits for it."""
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    torch.cuda.synchronize()
    return 1e6 * sorted(times)[len(times) // 2]


def main() -> None:
    rows_out = []
    for rows in (1, 16, 64, 128, 256):
        logits = torch.randn(rows, VOCAB, device="cuda", dtype=torch.bfloat16)
        expected = logits.float().argmax(dim=-1)
        variants = {"triton": lambda: argmax_rows(logits), "torch": lambda: torch.argmax(logits, dim=-1)}
        for name, function in variants.items():
            same = bool(torch.equal(function(), expected))
            device_us = 1e3 * graph_ms(function)
            row = dict(rows=rows, kernel=name, device_us=device_us, host_us=host_us(function), same=same)
            rows_out.append(row)
            print(f"argmax {rows:4d} rows {name:6s}: device {device_us:7.1f} us, host {row['host_us']:6.1f} us"
                  f" a launch, same tokens {same}", flush=True)
    if len(sys.argv) > 1:
        write_json(sys.argv[1], rows_out, indent=1)


if __name__ == "__main__":
    main()
