"""`joule bench throughput`: offline output tokens per second, optionally beside transformers."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

# The peers `--compare` runs, each on the same prompts in the same process and dtype.
PEERS = {
    "hf": "transformers generate in fixed batches of --hf-batch-size (fixed input and output lengths)",
    "hf-batch": "transformers generate_batch, its continuous batching over a paged cache (one output length)",
}


def add_throughput_arguments(parser: argparse.ArgumentParser) -> None:
    from joule.cli_args import add_engine_arguments

    add_engine_arguments(parser)
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", default="128",
                        help="prompt tokens: N, uniform:LO:HI (inclusive) or lognormal:MEDIAN:SIGMA[:MAX]; "
                        "uniform:100:1024 for both is nano-vllm's workload")
    parser.add_argument("--output-len", default="64", help="output tokens, as --input-len")
    parser.add_argument("--workload-seed", type=int, default=0)
    parser.add_argument(
        "--compare", nargs="+", choices=sorted(PEERS), default=[], metavar="PEER",
        help="also run these peers on the same prompts, one after Joule: " + "; ".join(
            f"{name}: {description}" for name, description in PEERS.items()),
    )
    parser.add_argument("--hf-batch-size", type=int, default=None,
                        help="transformers generate's batch (default: all prompts)")
    parser.add_argument("--output-json", default=None, help="write raw results here")
    parser.add_argument(
        "--repeat", type=int, default=1,
        help="run each engine this many times, alternating, and report each one's best run "
        "(for a machine shared with other work; keeps both models in memory)",
    )


def run_throughput(args: argparse.Namespace) -> int:
    import torch

    from joule.bench.workload import distribution_workload
    from joule.cli_args import engine_config_from_args
    from joule.llm_engine import LLMEngine

    if args.repeat < 1:
        raise ValueError(f"--repeat must be at least 1, got {args.repeat}")
    input_len, output_len = _length_argument(args.input_len, "input"), _length_argument(args.output_len, "output")
    if "hf" in args.compare and not (input_len.kind == output_len.kind == "fixed"):
        raise ValueError("--compare hf needs fixed --input-len and --output-len: transformers generate runs its "
                         "batch at one prompt and one output length")
    if "hf-batch" in args.compare and output_len.kind != "fixed":
        raise ValueError("--compare hf-batch needs a fixed --output-len: transformers generate_batch takes one "
                         "output length for all requests")
    peers = list(dict.fromkeys(args.compare))  # each peer once, in the order asked
    engine = LLMEngine(engine_config_from_args(args))
    special = set(engine.tokenizer.all_special_ids) if engine.tokenizer is not None else set()
    requests = distribution_workload(
        args.num_prompts, input_len, output_len, engine.model_config.vocab_size, args.workload_seed, special
    )
    load_before = os.getloadavg()[0]
    if args.repeat == 1:
        results = [_run_joule(engine, requests)]
        model_path, dtype, device = engine.model_path, engine.dtype, engine.device
        del engine  # free its memory before transformers loads
        for peer in peers:
            _release_memory(device)
            results.append(_run_peer(peer, model_path, requests, dtype, device, args))
    else:
        results = _run_alternating(engine, requests, args, peers)
    info = {
        "model": args.model or "smollm2-135m",
        "dtype": results[0]["dtype"],
        "num_prompts": args.num_prompts,
        "input_len": input_len.describe(),
        "output_len": output_len.describe(),
        "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        # Other work on the machine moves these numbers; the 1-minute load average says how much.
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }
    width = max(24, *(len(result["engine"]) + 2 for result in results))
    print(f"\n{'engine':<{width}}{'output tok/s':>14}{'elapsed s':>12}{'tokens':>10}")
    for result in results:
        print(f"{result['engine']:<{width}}{result['output_tok_per_s']:>14.1f}{result['elapsed_s']:>12.2f}{result['output_tokens']:>10}")
        if "all_output_tok_per_s" in result:
            print(f"  all {len(result['all_output_tok_per_s'])} runs: "
                  + ", ".join(f"{value:.1f}" for value in result["all_output_tok_per_s"]))
    ratios = {peer["engine"]: results[0]["output_tok_per_s"] / peer["output_tok_per_s"] for peer in results[1:]}
    for name, ratio in ratios.items():
        print(f"Joule / {name}: {ratio:.2f}x")
    if ratios:
        info["ratios"] = ratios
        info["ratio"] = next(iter(ratios.values()))  # the first peer's, as before several peers could run
    print(f"load average (1 min): {info['load_average_before']:.2f} before, {info['load_average_after']:.2f} after")
    if args.output_json:
        with open(args.output_json, "w") as handle:
            json.dump({"info": info, "results": results}, handle, indent=2)
    return 0


def _length_argument(text: str, role: str):
    """``--input-len`` / ``--output-len`` parsed, a bad value named by its option."""
    from joule.bench.workload import LengthDistribution

    try:
        return LengthDistribution.parse(str(text), role)
    except ValueError as error:
        raise ValueError(f"--{role}-len: {error}") from None


def _run_alternating(engine, requests, args, peers: list[str]) -> list[dict]:
    """Joule, then each peer, then Joule again, ...: the same interference can hit any; each keeps its best run.
    Every model stays loaded beside Joule's engine (on a GPU, leave room with --gpu-memory-utilization)."""
    loaded = {peer: _load_peer(peer, engine.model_path, engine.dtype, engine.device) for peer in peers}
    runs: dict[str, list[dict]] = {"joule": [], **{peer: [] for peer in peers}}
    for round_index in range(args.repeat):
        runs["joule"].append(_run_joule(engine, requests, round_index))
        for peer in peers:
            runs[peer].append(_run_peer(peer, engine.model_path, requests, engine.dtype, engine.device, args,
                                        loaded[peer]))
    results = []
    for engine_runs in runs.values():
        best = dict(max(engine_runs, key=lambda run: run["output_tok_per_s"]))
        best["all_output_tok_per_s"] = [run["output_tok_per_s"] for run in engine_runs]
        results.append(best)
    return results


def _load_peer(peer: str, model_path, dtype, device):
    from joule.bench.hf_continuous import load_paged_model, load_transformers_model

    if peer == "hf":
        return load_transformers_model(model_path, dtype, device)
    return load_paged_model(model_path, dtype, device)


def _run_peer(peer: str, model_path, requests, dtype, device, args, loaded=None) -> dict:
    """One timed run of ``peer``; ``loaded``: its model from ``_load_peer`` (else it loads its own, untimed)."""
    if peer == "hf":
        from joule.bench.hf_baseline import run_transformers_generate

        return run_transformers_generate(model_path, requests, dtype, device, args.hf_batch_size or len(requests),
                                         model=loaded)
    from joule.bench.hf_continuous import run_transformers_generate_batch

    return run_transformers_generate_batch(model_path, requests, dtype, device, loaded=loaded)


def _release_memory(device) -> None:
    """What the engine or the previous peer held goes back before the next model loads."""
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _run_joule(engine, requests, round_index: int = 0) -> dict:
    from tqdm.auto import tqdm

    from joule.heap import heap_frozen_while_running
    from joule.offline_loop import adder, run_until_done
    from joule.sampling_params import RequestOutputKind, SamplingParams

    # A short warm-up so one-time costs (allocator, first kernels) are not timed.
    warm = SamplingParams(max_tokens=2, ignore_eos=True, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
    engine.add_request("warmup", {"prompt_token_ids": requests[0].prompt_token_ids[:16]}, warm)
    while engine.has_unfinished_requests():
        engine.step()
    engine.block_manager.reset_prefix_cache()

    # As LLM.generate runs: no full collections of the start-up heap mid-run (joule/heap.py).
    with tqdm(total=len(requests), desc="joule", dynamic_ncols=True) as progress, heap_frozen_while_running():
        started = time.perf_counter()
        counted = []

        def on_output(output) -> None:
            if output.finished:
                counted.append(len(output.outputs[0].token_ids))
                progress.update(1)

        # As LLM.generate adds them: the first steps' worth, then more between steps (joule/offline_loop.py).
        run_until_done(engine, adder(engine, (
            (f"bench-{round_index}-{index}", {"prompt_token_ids": request.prompt_token_ids},
             SamplingParams(max_tokens=request.output_len, ignore_eos=True, temperature=0.0,
                            output_kind=RequestOutputKind.FINAL_ONLY))
            for index, request in enumerate(requests))), on_output)
        output_tokens = sum(counted)
    elapsed = time.perf_counter() - started
    return {"engine": "joule", "elapsed_s": elapsed, "output_tokens": output_tokens,
            "output_tok_per_s": output_tokens / elapsed, "dtype": str(engine.dtype)}
