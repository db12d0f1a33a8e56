"""Batch-1 decode graph replay time against the split-K factor of decode attention, by context length.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/short_context_sweep.py [out.json] [--fused]
Llama-3.2-1B shape, bf16, dummy weights. For each forced split count (default: the graph's own choice for
max_model_len) the decode graphs are captured again, a request is brought to each context length, and its
batch-1 graph is replayed back to back. One split writes the output directly (no merge launch).
``--fused``: instead of split counts, the graphs' own choice with the fused attention + o projection kernel
(``joule.kernels.attention_output``) on and off, alternated twice.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from joule.bench.workload import fixed_length_workload
from joule.llm_engine import LLMEngine
from joule.runtime.cuda_graphs import enable_engine_cuda_graphs
from joule.sampling_params import RequestOutputKind, SamplingParams

CONTEXTS = (64, 128, 256, 384, 512, 768, 1024, 2048)
SPLITS = (None, 1, 2, 3, 4, 8)
REPLAYS = 300


def replay_seconds(graph: torch.cuda.CUDAGraph, replays: int, warmup: int) -> float:
    """Mean wall seconds of one replay, ``replays`` back to back after ``warmup`` untimed ones."""
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - started) / replays


def replay_us(engine: LLMEngine, prompt: list[int]) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY)
    engine.add_request(f"sweep-{time.monotonic_ns()}", {"prompt_token_ids": prompt}, params)
    engine.step()
    engine.step()  # one decode: the batch-1 graph's inputs hold this context
    runner = engine.core.executor.graph_runner  # the variant a step of this context replays
    graph = (runner.short_graphs if runner.is_short(1, len(prompt) + 2) else runner.graphs)[1]
    elapsed = replay_seconds(graph, REPLAYS, warmup=20) * 1e6
    while engine.has_unfinished_requests():
        engine.step()
    return elapsed


def main(out_path: str | None, fused_ab: bool = False) -> None:
    engine = LLMEngine.from_kwargs(model="benchmarks/configs/llama-3.2-1b", load_format="dummy", dtype="bfloat16",
                                   max_model_len=4096, decode_lookahead=False)
    engine.core.step_observer = None
    executor = engine.core.executor
    prompts = {length: fixed_length_workload(1, length, 4, engine.model_config.vocab_size, seed=length)[0]
               .prompt_token_ids for length in CONTEXTS}
    table = {}
    variants = [(None, fused) for _ in range(2) for fused in (True, False)] if fused_ab else [
        (splits, executor.backend.fuse_output_projection) for splits in SPLITS]
    for round_index, (splits, fused) in enumerate(variants):
        executor.backend.decode_num_splits = splits
        executor.backend.fuse_output_projection = fused
        executor.graph_runner = None
        executor.chunk_runner = None
        if not enable_engine_cuda_graphs(engine):
            raise SystemExit("no CUDA graphs")
        chosen = executor.graph_runner.metadata[1].num_splits
        label = f"{'auto' if splits is None else splits} ({chosen})"
        if fused_ab:
            label += f" {'fused' if fused else 'unfused'} #{round_index // 2}"
        table[label] = {length: replay_us(engine, prompts[length]) for length in CONTEXTS}
        print(label, {length: round(value, 1) for length, value in table[label].items()}, flush=True)
    print(f"{'splits (graph)':>16}" + "".join(f"{length:>8}" for length in CONTEXTS))
    for label, row in table.items():
        print(f"{label:>16}" + "".join(f"{row[length]:8.1f}" for length in CONTEXTS))
    if out_path:
        with open(out_path, "w") as handle:
            json.dump({"replay_us": table, "contexts": CONTEXTS, "device": torch.cuda.get_device_name()}, handle,
                      indent=1)


if __name__ == "__main__":
    arguments = [argument for argument in sys.argv[1:] if argument != "--fused"]
    main(arguments[0] if arguments else None, fused_ab="--fused" in sys.argv[1:])
