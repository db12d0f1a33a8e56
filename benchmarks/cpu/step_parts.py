"""Where a CPU run of the issue-2 workload spends its steps: each step's time and page faults, a decode step's parts.

Usage: PYTHONPATH=. python benchmarks/cpu/step_parts.py [--dtype bfloat16] [--num-prompts 32] [--input-len 128]
       [--output-len 64] [--runs 2]

Runs the workload as ``joule bench throughput`` does (``_run_joule``: prefix cache reset, FINAL_ONLY outputs) on the
default model, after one unmeasured run. Prints every step's prompt and decode tokens, milliseconds and minor page
faults (``resource.getrusage``: fresh pages of temporaries show up here, joule/runtime/host_allocator.py), then the
median full decode step split into the forward's parts, timed by wrappers (perf_counter, ~1 us each): the GEMMs,
the RMSNorms, rotary, SwiGLU, the attention backend (of it the SDPA call, the paged-cache writes and the dense
copies), and what runs outside the model (inputs, logits' argmax, outputs).
"""

from __future__ import annotations

import argparse
import collections
import resource
import statistics
import time

import joule.model.layers as layers
import joule.model.llama as llama
import joule.runtime.attention.decode_contexts as decode_contexts
import joule.runtime.attention.portable as portable
from joule.bench.throughput import _length_argument, _run_joule
from joule.bench.workload import distribution_workload
from joule.config import EngineConfig
from joule.llm_engine import LLMEngine

Timers = collections.Counter


def timed(timers: Timers, key: str, function):
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            timers[key] += time.perf_counter() - started
    return wrapper


PARTS = ((layers.MergedLinear, "forward", "GEMMs"), (layers.RMSNorm, "forward", "RMSNorm"),
         (llama, "apply_rotary", "rotary"), (layers, "swiglu", "SwiGLU"),
         (llama.LlamaForCausalLM, "forward", "model forward"),
         (portable.PortableAttentionBackend, "forward", "attention"),
         (portable, "_attend_one_row_each", "attention: SDPA"), (portable, "_write_kv", "attention: cache writes"),
         (decode_contexts.DecodeContexts, "dense", "attention: dense copies"))


def instrument(timers: Timers, patch=setattr) -> None:
    """Wrap the forward's parts (module functions where the model calls them by name, methods elsewhere)."""
    for owner, name, key in PARTS:
        patch(owner, name, timed(timers, key, getattr(owner, name)))


def main(argv: list[str] | None = None, patch=setattr) -> list[dict]:
    """Each run's throughput, steps and decode-step medians (``patch``: how the wrappers go in; tests undo them)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", default="128")
    parser.add_argument("--output-len", default="64")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--load-format", default="auto", help="dummy: random weights from the config alone")
    args = parser.parse_args(argv)
    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, load_format=args.load_format))
    special = set(engine.tokenizer.all_special_ids) if engine.tokenizer is not None else set()
    requests = distribution_workload(args.num_prompts, _length_argument(args.input_len, "input"),
                                     _length_argument(args.output_len, "output"), engine.model_config.vocab_size, 0,
                                     special)
    _run_joule(engine, requests)  # unmeasured: first-use costs
    timers: Timers = Timers()
    instrument(timers, patch)
    execute, steps, summaries = engine.core.executor.execute, [], []

    def measured_execute(plan):
        before, faults = dict(timers), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        started = time.perf_counter()
        result = execute(plan)
        parts = {key: timers[key] - before.get(key, 0.0) for key in timers}
        parts["step"] = time.perf_counter() - started
        steps.append((plan.num_prefill_tokens, plan.num_decode_tokens, parts,
                      resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults))
        return result

    engine.core.executor.execute = measured_execute
    for run in range(args.runs):
        steps.clear()
        result = _run_joule(engine, requests, run + 1)
        print(f"run {run + 1}: {result['output_tok_per_s']:.1f} output tok/s, {len(steps)} steps (the first two are "
              f"the run's warm-up request), {sum(step[3] for step in steps)} minor page faults")
        for prompt, decode, parts, faults in steps:
            if prompt or decode != args.num_prompts:
                print(f"  {prompt:>5} prompt + {decode:>3} decode tokens: {parts['step'] * 1e3:7.1f} ms, "
                      f"{faults} faults")
        full = [parts for prompt, decode, parts, _ in steps if not prompt and decode == args.num_prompts]
        median = ({key: statistics.median(parts.get(key, 0.0) for parts in full) * 1e3 for key in full[0]}
                  if full else {})
        summaries.append({"output_tok_per_s": result["output_tok_per_s"], "steps": list(steps),
                          "decode_step_ms": median})
        if median:
            print(f"  {len(full)} decode steps of {args.num_prompts} rows, medians (ms): "
                  + ", ".join(f"{key} {value:.1f}" for key, value in median.items()))
            print(f"    outside the model: {median['step'] - median['model forward']:.1f}")
    engine.core.executor.execute = execute
    return summaries


if __name__ == "__main__":
    main()
