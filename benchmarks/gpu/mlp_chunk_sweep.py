"""A prompt step's SwiGLU MLP run whole or in row chunks whose gate/up output stays in L2 (one GPU call, ~30 s).

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/mlp_chunk_sweep.py [out.json]
Why: at 8,192 rows (workload 3's prompt steps, Llama-3.2-1B) the gate/up GEMM writes a 268 MB output that
``silu_and_mul`` reads back from DRAM and the down GEMM reads its 134 MB product again: 137 us a layer for the
activation alone on the H100 (2026-12-05 (f)), ~4.6 % of workload 3. In chunks of ~1k rows the gate/up output
(~34 MB) fits the 50 MB L2, so the activation and down read it from there, at the price of smaller GEMMs.
16 layers' MLPs with distinct weights (~1.6 GB, from DRAM as in the engine) chained in one CUDA graph; prints
us a layer and TFLOP/s for each chunk size, with the largest difference to the whole-step result.
Result (H100 80GB, 2026-12-06 (j)): every chunk size was slower at 8,192 rows (whole 1,215.5 us a layer, 678
TFLOP/s; chunks of 4,096-512 rows 1,261-1,465 us) and workload 3 did not move (32,263 against 32,089 tok/s median of
two rounds, `bs1_ab.py --w3 JOULE_MLP_ROW_CHUNK=0,2048`): the engine's switch was removed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import timed_graph  # noqa: E402

from joule.kernels.activation import silu_and_mul  # noqa: E402

LAYERS = 16
HIDDEN, INTERMEDIATE = 2048, 8192


def mlp_in_chunks(hidden: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, chunk: int,
                  output: torch.Tensor) -> None:
    """``down(silu(gate) * up)`` of ``hidden`` written into ``output``, ``chunk`` rows at a time (0: whole)."""
    rows = hidden.shape[0]
    step = chunk or rows
    for start in range(0, rows, step):
        piece = hidden[start:start + step]
        torch.mm(silu_and_mul(F.linear(piece, gate_up)), down.t(), out=output[start:start + step])


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else None
    device = torch.device("cuda")
    layers = [(torch.randn(2 * INTERMEDIATE, HIDDEN, device=device, dtype=torch.bfloat16) * 0.02,
               torch.randn(HIDDEN, INTERMEDIATE, device=device, dtype=torch.bfloat16) * 0.02) for _ in range(LAYERS)]
    rows_out = []
    for rows in (8192, 4096, 2048):
        hidden = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16)
        outputs = [torch.empty(rows, HIDDEN, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)]
        flops = 2 * rows * HIDDEN * 3 * INTERMEDIATE
        reference = None
        for chunk in (0, 4096, 2048, 1536, 1024, 768, 512):
            if chunk >= rows:
                continue
            seconds = timed_graph(lambda index, chunk=chunk: mlp_in_chunks(hidden, *layers[index], chunk,
                                                                            outputs[index]), LAYERS)
            if reference is None:
                reference = outputs[0].float().clone()
            difference = (outputs[0].float() - reference).abs().max().item()
            row = dict(rows=rows, chunk=chunk, us=seconds * 1e6, tflops=flops / seconds / 1e12, max_diff=difference)
            rows_out.append(row)
            print(f"mlp: rows {rows:5d} chunk {chunk or rows:5d}  {row['us']:8.1f} us a layer  "
                  f"{row['tflops']:6.1f} TFLOP/s  max|diff| {difference:.4f}", flush=True)
        del hidden, outputs
    if out_path:
        with open(out_path, "w") as handle:
            json.dump(rows_out, handle, indent=1)


if __name__ == "__main__":
    main()
