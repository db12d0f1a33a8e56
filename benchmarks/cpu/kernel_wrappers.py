"""The Python our Triton kernel wrappers run per eager-step layer, with every launch stubbed out.

Usage: PYTHONPATH=. python benchmarks/cpu/kernel_wrappers.py [--decodes 100] [--chunks 14] [--chunk-len 570]
Why: on the H100 an eager prompt step of workload 2 (Qwen3-0.6B, ~100 decodes + ~14 prompt chunks) took its host
20-23 ms to launch, ~46 us of Python before each of ~170 Triton launches, as long as the GPU took to run it
(docs/benchmarks.md, 2026-12-05 (f)). Triton's own dispatch needs a GPU, but the wrappers' part (checks, output
allocations, launch parameters) runs anywhere: here the kernels are replaced by no-ops and the wrappers timed on
CPU tensors of that step's shapes (what the GPU host pays besides Triton's dispatch; allocations are CPU ones).
"""

from __future__ import annotations

import argparse
import contextlib
import timeit

import torch

import joule.kernels.activation as activation
import joule.kernels.kv_write as kv_write
import joule.kernels.paged_decode as paged_decode
import joule.kernels.paged_prefill as paged_prefill
import joule.kernels.rms_norm as rms_norm
import joule.kernels.rotary as rotary
from joule.runtime.attention.base import AttentionMetadata, KVCache
from joule.runtime.attention.triton_backend import TritonAttentionBackend

KERNELS = ((paged_decode, "_decode_partial_kernel"), (paged_decode, "_decode_merge_kernel"),
           (paged_prefill, "_prefill_kernel"), (kv_write, "_write_kv_kernel"), (rms_norm, "_rms_norm_kernel"),
           (rotary, "_rotary_kernel"), (activation, "_silu_and_mul_kernel"))


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def launches_stubbed():
    saved = [(module, name, getattr(module, name)) for module, name in KERNELS]
    try:
        for module, name, _ in saved:
            setattr(module, name, _NoLaunch())
        yield
    finally:
        for module, name, kernel in saved:
            setattr(module, name, kernel)


def time_wrappers(decodes: int = 100, chunks: int = 14, chunk_len: int = 570, number: int = 200) -> dict[str, float]:
    """Best microseconds a call of each wrapper (Qwen3-0.6B's heads), and of one layer's five, stubbed."""
    query_lengths = [1] * decodes + [chunk_len] * chunks
    context_lengths = [600] * decodes + [0] * chunks
    tokens, sequences = sum(query_lengths), len(query_lengths)
    starts = torch.tensor([0] + torch.tensor(query_lengths).cumsum(0).tolist(), dtype=torch.int64)
    cache = KVCache.allocate(1, 2048, 16, 8, 128, torch.bfloat16, "cpu")
    metadata = AttentionMetadata(
        query_start_locations=starts, slot_mapping=torch.arange(tokens), block_tables=torch.zeros(
            sequences, 80, dtype=torch.int32), query_lengths=query_lengths, context_lengths=context_lengths,
        sequence_lengths=[c + q for c, q in zip(context_lengths, query_lengths)])
    query = torch.randn(tokens, 16, 128, dtype=torch.bfloat16)
    key, value = torch.randn(tokens, 8, 128, dtype=torch.bfloat16), torch.randn(tokens, 8, 128, dtype=torch.bfloat16)
    hidden, norm = torch.randn(tokens, 1024, dtype=torch.bfloat16), torch.ones(1024, dtype=torch.bfloat16)
    cos, sin = torch.randn(tokens, 64), torch.randn(tokens, 64)
    head_norm = torch.ones(128, dtype=torch.bfloat16)
    gate_up = torch.randn(tokens, 2 * 3072, dtype=torch.bfloat16)
    backend = TritonAttentionBackend()
    calls = {
        "rms_norm": lambda: rms_norm.rms_norm(hidden, norm, 1e-6, hidden),
        "rotary + cache write": lambda: rotary.rotary_embedding_(
            query, key, cos, sin, head_norm, head_norm, 1e-6,
            cache=(value, cache.key_caches[0], cache.value_caches[0], metadata.slot_mapping)),
        "attention (decode + prefill)": lambda: backend.forward(0, query, key, value, cache, metadata, 0.1,
                                                                kv_stored=True),
        "silu_and_mul": lambda: activation.silu_and_mul(gate_up),
    }
    with launches_stubbed():
        backend.forward(0, query, key, value, cache, metadata, 0.1)  # the step's tensors, built once per step
        result = {name: 1e6 * min(timeit.repeat(call, number=number, repeat=5)) / number
                  for name, call in calls.items()}
    result["layer (two norms)"] = sum(result.values()) + result["rms_norm"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decodes", type=int, default=100)
    parser.add_argument("--chunks", type=int, default=14)
    parser.add_argument("--chunk-len", type=int, default=570)
    args = parser.parse_args()
    for name, micros in time_wrappers(args.decodes, args.chunks, args.chunk_len).items():
        print(f"{name:30s} {micros:7.1f} us")


if __name__ == "__main__":
    main()
