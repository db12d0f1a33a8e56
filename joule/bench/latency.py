"""`joule bench latency`: single-stream (or small-batch) decode speed against the memory roofline.

A decode step of a small batch must stream every weight and each sequence's KV
cache from device memory once, so its floor is ``bytes read / copy bandwidth``.
This command measures the step time, the copy bandwidth of the same device in
the same run, and prints how close the engine gets (``roofline %``).
Prefill is timed separately (a run with one output token) and taken out of the
decode numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from joule.heap import heap_frozen_while_running


def add_latency_arguments(parser: argparse.ArgumentParser) -> None:
    from joule.cli_args import add_engine_arguments
    from joule.config import EngineConfig

    add_engine_arguments(parser)
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens per sequence")
    parser.add_argument("--output-len", type=int, default=256, help="generated tokens per sequence")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--num-iters", type=int, default=3, help="timed repetitions (the median is reported)")
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0: greedy (default); above 0 every sequence samples, seeded, so runs repeat")
    if "enforce_eager" not in {field.name for field in fields(EngineConfig)}:
        parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs for decode steps")
    parser.add_argument("--output-json", default=None, help="write raw results here")


def run_latency(args: argparse.Namespace) -> int:
    from joule.bench.workload import fixed_length_workload
    from joule.cli_args import engine_config_from_args
    from joule.llm_engine import LLMEngine
    from joule.runtime.cuda_graphs import enable_engine_cuda_graphs

    for name in ("input_len", "output_len", "batch_size", "num_iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if not args.temperature >= 0:
        raise SystemExit(f"--temperature must be at least 0, got {args.temperature}")
    engine = LLMEngine(engine_config_from_args(args))
    graphs = enable_engine_cuda_graphs(engine, enforce_eager=getattr(args, "enforce_eager", False))
    special = set(engine.tokenizer.all_special_ids) if engine.tokenizer is not None else set()
    prompts = [request.prompt_token_ids for request in fixed_length_workload(
        args.batch_size, args.input_len, 1, engine.model_config.vocab_size, args.workload_seed, special)]
    result = measure_latency(engine, prompts, args.output_len, args.num_iters, temperature=args.temperature)
    result.update(model=args.model or "smollm2-135m", cuda_graphs=graphs)
    print_latency_table([result])
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


def measure_latency(engine, prompts: list[list[int]], output_len: int, num_iters: int = 3,
                    temperature: float = 0.0) -> dict:
    """Median prefill and full-generation times for ``prompts``; decode speed and roofline share.
    ``temperature`` > 0: every sequence samples (seeded), as a chat client usually asks."""
    import statistics

    _generate(engine, [prompt[:16] for prompt in prompts], 4, temperature)  # warm-up: first kernels, allocator
    prefill = statistics.median(_generate(engine, prompts, 1, temperature) for _ in range(num_iters))
    total = statistics.median(_generate(engine, prompts, output_len, temperature) for _ in range(num_iters))
    batch, input_len = len(prompts), len(prompts[0])
    decode_steps = max(1, output_len - 1)
    decode_seconds = max(total - prefill, 1e-9)
    step_ms = decode_seconds / decode_steps * 1e3
    bandwidth = copy_bandwidth(engine.device)
    weight_bytes, kv_bytes = decode_bytes_per_step(engine, batch, input_len + output_len / 2)
    roofline_ms = (weight_bytes + kv_bytes) / bandwidth * 1e3
    return {
        "device": _device_name(engine.device),
        "dtype": str(engine.dtype).removeprefix("torch."),
        "batch_size": batch,
        "input_len": input_len,
        "output_len": output_len,
        "temperature": temperature,
        "prefill_s": prefill,
        "total_s": total,
        "end_to_end_tok_per_s": batch * output_len / total,
        "decode_tok_per_s": batch * decode_steps / decode_seconds,
        "ms_per_step": step_ms,
        "weight_bytes": weight_bytes,
        "kv_bytes_per_step": kv_bytes,
        "copy_bandwidth_gb_per_s": bandwidth / 1e9,
        "roofline_ms_per_step": roofline_ms,
        "roofline_fraction": roofline_ms / step_ms,
    }


def decode_bytes_per_step(engine, batch: int, mean_context: float) -> tuple[int, int]:
    """Bytes a decode step must read: every weight but the embedding table (only ``batch`` rows
    are gathered; a tied output projection is a separate merged copy and is counted), plus the KV
    cache of ``batch`` sequences at ``mean_context`` tokens."""
    model = engine.model
    embedding = model.model.embed_tokens.weight
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    config = engine.model_config
    element = engine.kv_cache.key_caches[0].element_size()
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * element
    return weight_bytes, int(batch * mean_context * kv_per_token)


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted), best of several copies."""
    import torch

    # On a CPU the buffers must outgrow the last-level cache: the AMX dev VM reports 480 MiB of L3, where 128 MiB
    # copies ran at 42 GB/s from it and 512 MiB ones at 31 GB/s from memory, which is where the weights come from.
    size = (1 << 30) if device.type == "cuda" else (1 << 29)
    source = torch.empty(size, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(8):
        _sync(device)
        started = time.perf_counter()
        target.copy_(source)
        _sync(device)
        best = min(best, time.perf_counter() - started)
    del source, target
    return 2 * size / best


def print_latency_table(results: list[dict]) -> None:
    header = (f"{'model':<34}{'graphs':>7}{'B':>4}{'P->O':>11}{'tok/s':>10}{'ms/step':>9}"
              f"{'roofline ms':>12}{'% roofline':>11}{'GB/s copy':>10}")
    print(header)
    for r in results:
        print(f"{str(r.get('model'))[-34:]:<34}{r.get('cuda_graphs')!s:>7}{r['batch_size']:>4}"
              f"{str(r['input_len']) + '->' + str(r['output_len']):>11}{r['decode_tok_per_s']:>10.1f}"
              f"{r['ms_per_step']:>9.3f}{r['roofline_ms_per_step']:>12.3f}{100 * r['roofline_fraction']:>10.1f}%"
              f"{r['copy_bandwidth_gb_per_s']:>10.0f}")


def _generate(engine, prompts: list[list[int]], max_tokens: int, temperature: float = 0.0) -> float:
    """Seconds to finish ``prompts`` with ``max_tokens`` each (prefix cache reset: no hits)."""
    from joule.sampling_params import RequestOutputKind, SamplingParams

    engine.block_manager.reset_prefix_cache()
    params = SamplingParams(temperature=temperature, max_tokens=max_tokens, ignore_eos=True,
                            seed=0 if temperature > 0 else None, output_kind=RequestOutputKind.FINAL_ONLY)
    _sync(engine.device)
    with heap_frozen_while_running():  # as LLM.generate runs (joule/heap.py), from the first request added
        started = time.perf_counter()
        for index, prompt in enumerate(prompts):
            engine.add_request(f"latency-{time.monotonic_ns()}-{index}", {"prompt_token_ids": prompt}, params)
        while engine.has_unfinished_requests():
            engine.step()
    _sync(engine.device)
    return time.perf_counter() - started


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(device) -> str:
    import platform

    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
