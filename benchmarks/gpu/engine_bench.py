"""One GPU call: decode CUDA graphs checked against eager, then the issue-3 workloads timed.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/engine_bench.py [out.json] [--workload-three-only]
(a) float32 greedy tokens, graphs vs eager, Llama-3.2-1B shape, 32 mixed prompts;
(b) workload 1: Llama-3.2-1B bf16, batch 1, 128 -> 256: decode tok/s and % of the copy-bandwidth roofline;
(c) workload 2: Qwen3-0.6B bf16, 256 requests, input/output lengths uniform in [100, 1024], ignore_eos;
(d) 256 x (512 -> 128), Llama-3.2-1B bf16; (e) Llama-3.1-8B on workload 2 when time is left.
Weights are random (``load_format="dummy"``); every workload has a fixed seed. Batch 1, workload 2 and workload 3
also run with the decode lookahead off (it is on by default with CUDA), so both sit in the same table; workload 3
also with the lookahead queuing decode steps only (``lookahead_prompts=False``, the default before 2026-12-05 e).
``--workload-three-only``: (d) alone, on an engine built as (b) builds it but with no run before it: on a slow host
(2026-12-07 (t)) workload 3 ran 14 % slower inside the whole bench than from the CLI in a fresh process.
"""

from __future__ import annotations

import gc
import json
import random
import sys
import time
import traceback

import torch

from pathlib import Path

from joule.bench.hf_baseline import run_transformers_generate
from joule.bench.hf_continuous import run_transformers_generate_batch
from joule.bench.latency import measure_latency, print_latency_table
from joule.bench.workload import fixed_length_workload, uniform_length_workload
from joule.heap import heap_frozen_while_running
from joule.llm_engine import LLMEngine
from joule.offline_loop import adder, run_until_done
from joule.runtime.cuda_graphs import enable_engine_cuda_graphs
from joule.sampling_params import RequestOutputKind, SamplingParams

LLAMA_1B, QWEN3_06B, LLAMA_8B = ("benchmarks/configs/llama-3.2-1b", "benchmarks/configs/qwen3-0.6b",
                                 "benchmarks/configs/llama-3.1-8b")
STARTED = time.perf_counter()


def generate(engine: LLMEngine, prompts: list[list[int]], output_lens: list[int]) -> tuple[list[list[int]], float]:
    """Greedy, ignore_eos; returns tokens in prompt order and wall seconds."""
    engine.block_manager.reset_prefix_cache()
    torch.cuda.synchronize()
    started = time.perf_counter()
    tag = time.monotonic_ns()
    results = {}

    def keep(output) -> None:
        results[output.request_id] = list(output.outputs[0].token_ids)

    with heap_frozen_while_running():  # as LLM.generate runs (joule/heap.py), from the first request added
        # Requests go in as LLM.generate adds them: the first steps' worth, then more between steps.
        run_until_done(engine, adder(engine, (
            (f"{tag}-{index}", {"prompt_token_ids": prompt},
             SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY))
            for index, (prompt, length) in enumerate(zip(prompts, output_lens)))), keep)
    torch.cuda.synchronize()
    return [results[f"{tag}-{index}"] for index in range(len(prompts))], time.perf_counter() - started


def build(model: str, **kwargs) -> tuple[LLMEngine, bool, float]:
    engine = LLMEngine.from_kwargs(model=model, load_format="dummy", **kwargs)
    started = time.perf_counter()
    try:
        graphs = enable_engine_cuda_graphs(engine)
    except Exception:  # noqa: BLE001 - report and carry on eagerly, so the other numbers still come back
        traceback.print_exc()
        graphs = False
    return engine, graphs, time.perf_counter() - started


def release() -> None:
    """Free the last engine's KV cache and graph pools (the caller drops its reference first)."""
    gc.collect()
    torch.cuda.empty_cache()


def timed_execute(engine: LLMEngine) -> list[float]:
    """Wrap the executor so each step's execute() wall time (incl. the sampler's sync) is recorded."""
    executor, times = engine.core.executor, []
    original = executor.execute

    def execute(plan):
        started = time.perf_counter()
        result = original(plan)
        times.append(time.perf_counter() - started)
        return result

    executor.execute = execute
    engine.core.executor = executor
    return times


def batch_one_variants(graphs: bool) -> tuple[tuple[bool, bool, bool, float], ...]:
    """(CUDA graphs, NVML-metered, lookahead, temperature) of each batch-1 run. Sampled rows (temperature 0.8,
    seeded) as well as greedy: the lookahead continues past them too."""
    return ((graphs, True, False, 0.0), (graphs, False, False, 0.0), (graphs, False, True, 0.0),
            (graphs, False, False, 0.8), (graphs, False, True, 0.8), (False, False, False, 0.0))


def apply_batch_one_variant(engine: LLMEngine, observer, use_graphs: bool, metered: bool, lookahead: bool) -> None:
    engine.core.executor.use_cuda_graphs = use_graphs
    engine.core.step_observer = observer if metered else None
    engine.core.decode_lookahead = lookahead


def throughput(engine: LLMEngine, requests) -> dict:
    generate(engine, [requests[0].prompt_token_ids[:32]] * 4, [4] * 4)  # warm-up
    _, seconds = generate(engine, [r.prompt_token_ids for r in requests], [r.output_len for r in requests])
    output_tokens = sum(r.output_len for r in requests)
    return {"output_tok_per_s": output_tokens / seconds, "seconds": seconds, "output_tokens": output_tokens}


def graphs_match_eager(rows: list[tuple[str, str]], raw: dict) -> None:
    """(a): greedy tokens with CUDA graphs and eagerly, float32, chunked prefill so decode batch sizes vary step to
    step."""
    engine, graphs, capture_s = build(LLAMA_1B, dtype="float32", max_model_len=2048, max_num_seqs=32,
                                      max_num_batched_tokens=512, kv_cache_memory_bytes=8 << 30)
    generator = random.Random(0)
    prompts = [[generator.randrange(100, 30000) for _ in range(generator.randint(1, 700))] for _ in range(32)]
    lengths = [generator.randint(8, 40) for _ in prompts]
    runner = engine.core.executor.graph_runner
    replays = []
    if runner is not None:
        original = runner.run
        runner.run = lambda plan, token_source=None: replays.append(len(plan.sequences)) or original(plan, token_source)
    with_graphs, _ = generate(engine, prompts, lengths)
    engine.core.executor.use_cuda_graphs = False
    eager, _ = generate(engine, prompts, lengths)
    same = sum(a == b for a, b in zip(with_graphs, eager))
    summary = (f"{same}/{len(prompts)} (graphs {graphs}, {len(replays)} replays, "
               f"{len(set(replays))} batch sizes, capture {capture_s:.1f}s)")
    rows.append(("(a) fp32 greedy graphs == eager", summary))
    raw["a"] = {"same": same, "total": len(prompts), "graphs": graphs, "replays": len(replays)}
    print(rows[-1], flush=True)
    # The caller releases the memory: until this returns, ``original`` (the runner's bound method) keeps the runner,
    # its graphs and the executor alive (before (u) ~13 GB stayed in use, so workload 3's engine got 1.69M KV tokens,
    # not 2.09M).


def main() -> None:
    arguments = [argument for argument in sys.argv[1:] if not argument.startswith("--")]
    out_path = arguments[0] if arguments else "engine_bench.json"
    only_three = "--workload-three-only" in sys.argv[1:]
    device = torch.cuda.get_device_name()
    print(device, torch.__version__, flush=True)
    rows: list[tuple[str, str]] = []
    raw: dict = {"device": device, "torch": torch.__version__}

    if not only_three:
        graphs_match_eager(rows, raw)
        release()

    # (b) + (d): Llama-3.2-1B bf16.
    engine, graphs, capture_s = build(LLAMA_1B, dtype="bfloat16", max_model_len=4096)
    print("capture s", capture_s, "KV tokens", engine.kv_capacity_tokens, flush=True)
    vocab = engine.model_config.vocab_size
    prompt = fixed_length_workload(1, 128, 256, vocab, seed=1)[0].prompt_token_ids
    latency = []
    observer = engine.core.step_observer  # the energy ledger reads NVML twice a step
    step_times = timed_execute(engine)
    for use_graphs, metered, lookahead, temperature in () if only_three else batch_one_variants(graphs):
        apply_batch_one_variant(engine, observer, use_graphs, metered, lookahead)
        step_times.clear()
        result = measure_latency(engine, [prompt], 256, num_iters=2, temperature=temperature)
        decode_steps = sorted(step_times)[: len(step_times) * 9 // 10]  # drop prefills
        result.update(model=f"1b bf16 {'nvml-metered' if metered else 'unmetered'}{' lookahead' if lookahead else ''}"
                            f"{f' T={temperature}' if temperature else ''}",
                      cuda_graphs=use_graphs,
                      execute_ms=1e3 * sum(decode_steps) / max(1, len(decode_steps)))
        latency.append(result)
    engine.core.step_observer = None  # throughput numbers below: no per-step NVML reads
    if latency:
        print_latency_table(latency)
    for result in latency:
        rows.append((f"(b) 1B bs1 decode tok/s, graphs={result['cuda_graphs']}, {result['model'][8:]}",
                     (f"{result['decode_tok_per_s']:.1f} ({result['ms_per_step']:.3f} ms/step, "
                     f"{100 * result['roofline_fraction']:.1f}% of {result['roofline_ms_per_step']:.3f} ms roofline, "
                     f"execute() {result['execute_ms']:.3f} ms)")))
        rows.append((f"(b) e2e tok/s incl. prefill, graphs={result['cuda_graphs']}, {result['model'][8:]}",
                     f"{result['end_to_end_tok_per_s']:.1f}"))
    raw["b"] = latency
    engine.core.executor.use_cuda_graphs = graphs
    workload_three = fixed_length_workload(256, 512, 128, vocab, seed=2)
    # The default on CUDA last (lookahead on, prompt steps queued ahead too), run three times on the engine: its
    # median is what the peers' ratios use. One run moved by up to ~15 % (28-33k tok/s on the H100 on 2026-12-05
    # (d), benchmarks/gpu/w3_runs_probe.py: full garbage collections of ~160 ms inside some runs, since held off).
    for lookahead, prompts, label, repeats in ((False, False, " no lookahead", 1),
                                               (True, False, " decode steps queued only", 1), (True, True, "", 3)):
        engine.core.decode_lookahead = lookahead
        engine.core.scheduler.config.lookahead_prompts = prompts
        runs = [throughput(engine, workload_three) for _ in range(repeats)]
        result = dict(sorted(runs, key=lambda run: run["output_tok_per_s"])[len(runs) // 2])
        result["runs_tok_per_s"] = [round(run["output_tok_per_s"]) for run in runs]
        every = f", runs {result['runs_tok_per_s']}, median" if repeats > 1 else ""
        rows.append((f"(d) 1B 256x(512->128){label} output tok/s",
                     f"{result['output_tok_per_s']:.0f} ({result['seconds']:.2f}s{every})"))
        raw["d" + label.replace(" ", "_")] = result
        print(rows[-1], flush=True)
    engine = None
    release()
    # (d) peers in the same run: transformers generate_batch (paged) and generate (batch 64), same prompts.
    # generate_batch twice on its loaded model (the faster run counts): it moved 971-1,363 tok/s between calls.
    for label, peer in (("generate_batch", lambda: run_transformers_generate_batch(
                            Path(LLAMA_1B), workload_three, torch.bfloat16, torch.device("cuda"), repeats=2)),
                        ("generate bs64", lambda: run_transformers_generate(
                            Path(LLAMA_1B), workload_three, torch.bfloat16, torch.device("cuda"), 64))):
        try:
            peer_result = peer()
        except Exception as error:  # noqa: BLE001 - a failing peer must not cost Joule's numbers
            traceback.print_exc()
            peer_result = {"error": repr(error)}
        raw[f"d_{label}"] = peer_result
        if "output_tok_per_s" in peer_result:
            ratio = result["output_tok_per_s"] / peer_result["output_tok_per_s"]
            spread = [run / peer_result["output_tok_per_s"] for run in result["runs_tok_per_s"]]
            peer_runs = peer_result.get("runs_tok_per_s", [])
            listed = f", peer runs {', '.join(f'{run:.0f}' for run in peer_runs)}" if len(peer_runs) > 1 else ""
            rows.append((f"(d) transformers {label} output tok/s",
                         f"{peer_result['output_tok_per_s']:.0f} ({peer_result['elapsed_s']:.1f}s) -> Joule {ratio:.1f}x"
                         f" (runs {min(spread):.1f}-{max(spread):.1f}x{listed})"))
        else:
            rows.append((f"(d) transformers {label}", peer_result["error"][:60]))
        print(rows[-1], flush=True)
        release()

    # (c) workload 2 on Qwen3-0.6B, then (e) on Llama-3.1-8B when time is left.
    workload_two_runs = (("(c) qwen3-0.6b no lookahead", QWEN3_06B, "auto", None),
                         ("(c) qwen3-0.6b", QWEN3_06B, "auto", None), ("(c) qwen3-0.6b fp8 KV", QWEN3_06B, "fp8", None),
                         ("(e) llama-3.1-8b", LLAMA_8B, "auto", 330))
    for label, model, kv_dtype, budget_s in () if only_three else workload_two_runs:
        if budget_s is not None and time.perf_counter() - STARTED > budget_s:
            rows.append((f"{label} workload 2", "skipped (time)"))
            continue
        engine, graphs, capture_s = build(model, dtype="bfloat16", max_model_len=4096, kv_cache_dtype=kv_dtype,
                                          decode_lookahead="no lookahead" not in label)
        engine.core.step_observer = None
        print(label, "capture s", capture_s, "KV tokens", engine.kv_capacity_tokens, flush=True)
        requests = uniform_length_workload(256, 100, 1024, engine.model_config.vocab_size, seed=0)
        result = throughput(engine, requests)
        result["graphs"] = graphs
        rows.append((f"{label} workload 2 output tok/s", (f"{result['output_tok_per_s']:.0f} "
                     f"({result['output_tokens']} tokens, {result['seconds']:.2f}s, graphs {graphs})")))
        raw[label] = result
        print(rows[-1], flush=True)
        engine = None
        release()

    print(f"\n{device}, torch {torch.__version__}, total {time.perf_counter() - STARTED:.0f}s")
    for name, value in rows:
        print(f"{name:<58}{value}")
    with open(out_path, "w") as handle:
        json.dump(raw, handle, indent=2, default=str)


if __name__ == "__main__":
    main()
