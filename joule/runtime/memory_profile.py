"""How much GPU memory one worst-case step needs, measured before the KV cache takes the rest.

Why: the KV cache gets ``gpu_memory_utilization`` of the device minus the weights
minus what a step allocates on the fly (activations of ``max_num_batched_tokens``
rows, ``max_num_seqs`` rows of float32 logits and the sampler's sorts). Guessing
that last part either wastes cache or runs out of memory mid-serving; so, like
vLLM, we run one synthetic step of that size through the real executor and read
the allocator's peak. The same step compiles the Triton prefill kernels, so the
first real request does not pay for it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from joule.engine.plan import ScheduledSequence, StepPlan
from joule.engine.request import Request
from joule.runtime.attention.base import AttentionBackend, KVCache
from joule.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# Decode CUDA graphs, cuBLAS workspaces and allocator fragmentation come on top of the measured peak.
GRAPH_AND_FRAGMENTATION_RESERVE_BYTES = 512 << 20


@dataclass(frozen=True)
class StepMemoryProfile:
    peak_step_bytes: int  # allocated by the synthetic step beyond what was there before it
    num_tokens: int
    num_sequences: int


def profile_step_memory(
    model: torch.nn.Module,
    backend: AttentionBackend,
    device: torch.device,
    kv_cache_dtype: torch.dtype,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    num_tokens: int,
    max_num_seqs: int,
    vocab_size: int,
) -> StepMemoryProfile:
    """Run one step of ``num_tokens`` prompt tokens over up to ``max_num_seqs`` sequences, all sampling."""
    from joule.runtime.executor import ModelExecutor  # the executor imports this module's neighbours
    from joule.runtime.sampler import Sampler

    if device.type != "cuda":
        raise ValueError(f"profile_step_memory measures CUDA allocations; device is {device.type}")
    num_sequences = max(1, min(max_num_seqs, num_tokens))
    lengths = [num_tokens // num_sequences + (index < num_tokens % num_sequences) for index in range(num_sequences)]
    blocks_per_sequence = [-(-length // block_size) for length in lengths]
    scratch_cache = KVCache.allocate(num_layers, sum(blocks_per_sequence), block_size, num_kv_heads, head_dim,
                                     kv_cache_dtype, device)
    executor = ModelExecutor(model, scratch_cache, backend, Sampler(0, device), device)
    generator = torch.Generator().manual_seed(0)
    # Nucleus and top-k rows make the sampler sort full-vocabulary rows: its worst case.
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=1)
    plan = StepPlan()
    next_block = 0
    for index, length in enumerate(lengths):
        token_ids = torch.randint(0, vocab_size, (length,), generator=generator).tolist()
        request = Request(f"memory-profile-{index}", token_ids, params, max_tokens=1)
        block_ids = list(range(next_block, next_block + blocks_per_sequence[index]))
        next_block += blocks_per_sequence[index]
        request.block_ids = block_ids
        plan.sequences.append(ScheduledSequence(request, token_ids, 0, block_ids, samples=True))

    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    executor.execute(plan)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del executor, scratch_cache, plan
    torch.cuda.empty_cache()
    logger.info("memory profile: a %d-token step over %d sequences peaks at %.1f MiB above the weights",
                num_tokens, num_sequences, peak / 2**20)
    return StepMemoryProfile(peak_step_bytes=peak, num_tokens=num_tokens, num_sequences=num_sequences)


def gpu_kv_cache_budget(device: torch.device, gpu_memory_utilization: float, peak_step_bytes: int) -> int:
    """Bytes for the KV cache: the utilisation share of the device minus what is in use now (weights,
    CUDA context, other processes), the measured step peak and a reserve for graphs."""
    if not 0 < gpu_memory_utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
    free, total = torch.cuda.mem_get_info(device)
    in_use = total - free
    budget = int(total * gpu_memory_utilization) - in_use - peak_step_bytes - GRAPH_AND_FRAGMENTATION_RESERVE_BYTES
    return max(budget, 0)
