"""Engine options as command-line flags, shared by every subcommand that builds an engine."""

from __future__ import annotations

import argparse
from dataclasses import fields

from joule.config import EngineConfig

_HELP = {
    "model": "HF directory, .gguf file, hub id (org/name) or 'smollm2-135m' (default)",
    "dtype": "auto (bf16 where the CPU/GPU supports it), float32, bfloat16, float16",
    "device": "auto, cpu or cuda[:N]",
    "max_model_len": "longest prompt + output in tokens (default: model limit, capped by KV capacity)",
    "max_num_seqs": "most sequences in one step",
    "max_num_batched_tokens": "token budget per step (default 2048 on CPU, 8192 on GPU)",
    "enable_prefix_caching": "reuse KV blocks of shared prefixes",
    "block_size": "tokens per KV block",
    "kv_cache_memory_bytes": "bytes for the KV cache (default: a share of free memory)",
    "gpu_memory_utilization": "share of GPU memory the engine may use",
    "seed": "engine seed for unseeded sampling",
    "load_format": "auto, or dummy for random weights from config.json",
    "tokenizer": "tokenizer directory if not the model's",
    "enforce_eager": "never capture CUDA graphs (decode steps replay graphs on CUDA by default)",
    "decode_lookahead": "queue the next greedy decode step on the device before reading this one's tokens, so "
    "scheduling and output work overlap the GPU (default: on with CUDA, off on the CPU; a request that stops "
    "computes one token more, dropped)",
    "scheduling_policy": "fcfs, priority (lower value first, may preempt), fair (per-tenant token counters) or "
    "deadline (earliest TTFT deadline first; chunks cut to keep running decodes within their TPOT SLO)",
    "admission_policy": "greedy (admit while blocks last, preempt when they run out) or predicted (admit while the "
    "predicted peak KV use of the running set fits: Past-Future)",
    "fair_prompt_cap": "fair policy: most prompt tokens per step while a tenant with nothing waiting is about, so "
    "its next request waits behind a short step (lower: its latency, at the flooding tenants' throughput)",
    "fair_split_decodes": "fair policy: meanwhile, run a flooding tenant's decodes half per step (shorter steps for "
    "the protected tenant to wait behind, at the flooding tenant's time per output token)",
    "fair_keep_up": "fair policy: cut the other tenants' prompt chunks no shorter than they need to keep up with "
    "what they send (default: their throughput as under fcfs unless they flood, as a work-conserving VTC serves "
    "them; the protected tenant waits a little longer). --no-fair-keep-up: always the fixed cap, which protects "
    "it more but leaves the others waiting seconds at loads they could be served at",
    "enable_chunked_prefill": "stall-free chunked prefill (default); --no-enable-chunked-prefill is the prefill-first "
    "baseline: whole prompts whenever one can be admitted, decodes wait (max_num_batched_tokens defaults to "
    "max_model_len or more)",
}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    for field in fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool) or field.name == "decode_lookahead":  # the latter: None means auto
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=_HELP.get(field.name))
        elif field.name in ("max_model_len", "max_num_batched_tokens", "kv_cache_memory_bytes", "max_num_seqs", "block_size", "seed",
                            "fair_prompt_cap"):
            group.add_argument(flag, type=int, default=default, help=_HELP.get(field.name))
        elif field.name == "gpu_memory_utilization":
            group.add_argument(flag, type=float, default=default, help=_HELP.get(field.name))
        else:
            group.add_argument(flag, type=str, default=default, help=_HELP.get(field.name))


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{field.name: getattr(args, field.name) for field in fields(EngineConfig)})
