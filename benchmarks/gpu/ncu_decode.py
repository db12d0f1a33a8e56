"""One decode-attention launch per KV dtype at workload 2's step shape, for Nsight Compute.

Why: the fp8 cache reads half the bytes of bf16 yet runs about as long (decode_sweep.py --focus: 248 vs 276 us
on an H200, ~2.2 TB/s of fp8 bytes on both the H100 and the H200), so something other than memory bounds it.

Usage (GPU machine, repo root):
ncu --section SpeedOfLight --section WarpStateStats --section InstructionStats --section MemoryWorkloadAnalysis \
    -k regex:_decode_partial -c 4 python benchmarks/gpu/ncu_decode.py
(each dtype launches twice: the first compiles and warms, the second is the one to read).
"""

from __future__ import annotations

import torch

from decode_sweep import make_inputs  # beside this script
from joule.kernels.paged_decode import paged_decode_attention


def main() -> None:
    for cache_dtype, fp16_dot in ((torch.bfloat16, False), (torch.float8_e4m3fn, False)):
        query, keys, values, tables, lengths = make_inputs(256, 1024, 16, 8, 128, cache_dtype)
        output = torch.empty_like(query)
        for _ in range(2):
            paged_decode_attention(query, keys, values, tables, lengths, 1024, 128**-0.5, num_splits=1,
                                   output=output, launch={"fp16_dot": fp16_dot})
        torch.cuda.synchronize()
        print(cache_dtype, "done", flush=True)


if __name__ == "__main__":
    main()
