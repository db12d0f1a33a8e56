"""Does a dropped engine give its GPU memory back? (2026-12-07 (u))

engine_bench.py's workload-3 engine got 1.69M KV tokens after the float32 graphs check's engine was dropped, against
2.09M with nothing built before it: ~13 GB (that engine's weights and KV cache) still in use after ``del``,
``gc.collect()`` and ``torch.cuda.empty_cache()``. This builds engines as the bench and as users do, runs a few
requests, drops each and reports the memory in use afterwards; where the engine outlives the collection, it prints
the chain of objects that still refers to it.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/release_probe.py
"""

from __future__ import annotations

import gc
import sys
import time
import types
import weakref

import torch

from joule import LLM, SamplingParams
from joule.llm_engine import LLMEngine
from joule.runtime.cuda_graphs import enable_engine_cuda_graphs

LLAMA_1B = "benchmarks/configs/llama-3.2-1b"
GIB = 2**30


def in_use_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / GIB


def describe(value) -> str:
    if isinstance(value, types.FrameType):
        return f"frame {value.f_code.co_name} ({value.f_code.co_filename}:{value.f_lineno})"
    if isinstance(value, dict):
        return f"dict ({len(value)} keys: {', '.join(map(str, list(value)[:6]))})"
    if isinstance(value, (list, tuple, set)):
        return f"{type(value).__name__} of {len(value)}"
    if isinstance(value, types.CellType):
        return "closure cell"
    name = getattr(value, "__qualname__", None) or getattr(value, "name", None)
    return f"{type(value).__module__}.{type(value).__qualname__}" + (f" {name!r}" if isinstance(name, str) else "")


def referrer_chains(target, depth: int = 7, width: int = 4) -> list[list[str]]:
    """Paths from ``target`` up through the objects that refer to it (this probe's own frames and lists left out)."""
    internal = {id(sys._getframe())}
    chains: list[list[str]] = []
    internal.add(id(chains))

    def walk(value, path: list[str], seen: set[int]) -> None:
        if len(chains) >= 12:
            return
        found = gc.get_referrers(value)
        internal.add(id(found))
        referrers = [r for r in found if id(r) not in internal and id(r) not in seen
                     and not (isinstance(r, types.FrameType) and r.f_code.co_filename == __file__)]
        internal.add(id(referrers))
        del found
        if not referrers or len(path) >= depth:
            chains.append(path + (["(root or depth limit)"] if referrers else ["(no referrers)"]))
            return
        for referrer in referrers[:width]:
            longer = path + [describe(referrer)]
            internal.add(id(longer))
            walk(referrer, longer, seen | {id(referrer)})

    walk(target, [describe(target)], {id(target)})
    return chains


def check(label: str, make) -> None:
    gc.collect()
    torch.cuda.empty_cache()
    before = in_use_gib()
    holder = make()
    engine = holder.llm_engine if isinstance(holder, LLM) else holder
    built = in_use_gib()
    references = {"engine": weakref.ref(engine), "executor": weakref.ref(engine.core.executor),
                  "model": weakref.ref(engine.core.executor.model)}
    engine = holder = None
    gc.collect()
    torch.cuda.empty_cache()
    after = in_use_gib()
    alive = [name for name, reference in references.items() if reference() is not None]
    time.sleep(0.3)
    gc.collect()
    torch.cuda.empty_cache()
    later = in_use_gib()
    print(f"{label:<40} in use GiB: before {before:6.2f}  built {built:6.2f}  after drop {after:6.2f}  "
          f"0.3 s later {later:6.2f}  alive after drop: {alive or 'none'}  alive later: "
          f"{[n for n, r in references.items() if r() is not None] or 'none'}", flush=True)
    for name in ("engine", "executor", "model"):
        value = references[name]()
        if value is not None:
            print(f"  what still holds the {name}:")
            for chain in referrer_chains(value):
                print("    " + " <- ".join(chain))
            break
    value = None


def run_engine(engine: LLMEngine) -> LLMEngine:
    for index in range(4):
        engine.add_request(str(index), {"prompt_token_ids": list(range(100, 140 + 50 * index))},
                           SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    return engine


def bench_engine(dtype: str, **kwargs) -> LLMEngine:
    engine = LLMEngine.from_kwargs(model=LLAMA_1B, load_format="dummy", dtype=dtype, **kwargs)
    enable_engine_cuda_graphs(engine)
    return run_engine(engine)


def user_llm() -> LLM:
    llm = LLM(model=LLAMA_1B, load_format="dummy", dtype="bfloat16", max_model_len=4096)
    llm.generate([{"prompt_token_ids": list(range(100, 200))}] * 4, SamplingParams(max_tokens=8, ignore_eos=True))
    return llm


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, "frozen objects before:", gc.get_freeze_count(), flush=True)
    check("bench (a): float32, graphs, 8 GiB KV", lambda: bench_engine(
        "float32", max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512, kv_cache_memory_bytes=8 << 30))
    check("bench (d): bfloat16, graphs, default KV", lambda: bench_engine("bfloat16", max_model_len=4096))
    check("LLM(...).generate, bfloat16", user_llm)
    check("LLM(...).generate, bfloat16, again", user_llm)


if __name__ == "__main__":
    main()
