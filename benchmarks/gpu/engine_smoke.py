"""One GPU call: the engine end to end on CUDA, Triton vs portable backends, then throughput.

Usage (on the GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/engine_smoke.py
"""

from __future__ import annotations

import json
import random
import sys
import time

import torch

from joule.llm_engine import LLMEngine
from joule.runtime.attention.portable import PortableAttentionBackend
from joule.sampling_params import RequestOutputKind, SamplingParams


def run(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> tuple[list[list[int]], float]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    for index, prompt in enumerate(prompts):
        engine.add_request(f"r{time.time()}-{index}", {"prompt_token_ids": prompt}, params)
    results = {}
    torch.cuda.synchronize()
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        for output in engine.step():
            results[output.request_id] = output.outputs[0].token_ids
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    ordered = [results[key] for key in sorted(results, key=lambda k: int(k.rsplit("-", 1)[1]))]
    return ordered, elapsed


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "benchmarks/configs/llama-3.2-1b"
    print(torch.cuda.get_device_name(), torch.__version__)
    generator = random.Random(0)

    # 1. Correctness: Triton backend vs portable backend, float32, mixed lengths, chunked prefill.
    engine = LLMEngine.from_kwargs(model=config, load_format="dummy", dtype="float32", max_model_len=4096,
                                   max_num_batched_tokens=512, kv_cache_memory_bytes=8 << 30)
    print("backend:", engine.core.executor.backend.name)
    prompts = [[generator.randrange(100, 30000) for _ in range(generator.randint(1, 700))] for _ in range(48)]
    triton_tokens, _ = run(engine, prompts, 24)
    engine.core.executor.backend = PortableAttentionBackend()
    engine.block_manager.reset_prefix_cache()
    portable_tokens, _ = run(engine, prompts, 24)
    same = sum(a == b for a, b in zip(triton_tokens, portable_tokens))
    print(f"float32 greedy: triton == portable for {same}/{len(prompts)} requests")
    del engine
    torch.cuda.empty_cache()

    # 2. Throughput, bf16: 256 x (512 -> 128) and batch-1 decode 128 -> 256.
    results = {}
    for backend_name in ("triton", "portable"):
        engine = LLMEngine.from_kwargs(model=config, load_format="dummy", dtype="bfloat16", max_model_len=4096)
        if backend_name == "portable":
            engine.core.executor.backend = PortableAttentionBackend()
        run(engine, [[5] * 64] * 4, 4)  # warm-up
        workload = [[generator.randrange(100, 30000) for _ in range(512)] for _ in range(256)]
        _, elapsed = run(engine, workload, 128)
        results[f"{backend_name} 256x(512->128) output tok/s"] = 256 * 128 / elapsed
        _, elapsed = run(engine, [[generator.randrange(100, 30000) for _ in range(128)]], 256)
        results[f"{backend_name} batch-1 decode tok/s (incl. prefill)"] = 256 / elapsed
        print(backend_name, "KV tokens", engine.kv_capacity_tokens, flush=True)
        del engine
        torch.cuda.empty_cache()
    for key, value in results.items():
        print(f"{key:<48}{value:>10.1f}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
