"""Greedy float32 tokens, CUDA graphs vs eager (engine_bench.py's part (a)), under switches for bisecting.

Usage (GPU machine): PYTHONPATH=. python benchmarks/gpu/graphs_check.py [no-lookahead]
(JOULE_PDL=0 turns programmatic dependent launch off.) It found that an in-kernel merge of decode splits (the last
split to finish merging, through arrival counters) broke graphs == eager on the H200 (6/32 against 32/32 with the
merge kernel) although it passed every interpreter test; that merge was taken out.
"""

from __future__ import annotations

import random
import sys

from joule.llm_engine import LLMEngine
from joule.runtime.cuda_graphs import enable_engine_cuda_graphs
from joule.sampling_params import RequestOutputKind, SamplingParams


def main() -> None:
    engine = LLMEngine.from_kwargs(model="benchmarks/configs/llama-3.2-1b", load_format="dummy", dtype="float32",
                                   max_model_len=2048, max_num_seqs=32, max_num_batched_tokens=512,
                                   kv_cache_memory_bytes=8 << 30, decode_lookahead="no-lookahead" not in sys.argv)
    enable_engine_cuda_graphs(engine)
    generator = random.Random(0)
    prompts = [[generator.randrange(100, 30000) for _ in range(generator.randint(1, 700))] for _ in range(32)]
    lengths = [generator.randint(8, 40) for _ in prompts]
    results = []
    for use_graphs in (True, False):
        engine.core.executor.use_cuda_graphs = use_graphs
        engine.block_manager.reset_prefix_cache()
        outputs = {}
        for index, (prompt, length) in enumerate(zip(prompts, lengths)):
            engine.add_request(f"{use_graphs}-{index}", {"prompt_token_ids": prompt},
                               SamplingParams(temperature=0.0, max_tokens=length, ignore_eos=True,
                                              output_kind=RequestOutputKind.FINAL_ONLY))
        while engine.has_unfinished_requests():
            for output in engine.step():
                outputs[output.request_id] = list(output.outputs[0].token_ids)
        results.append([outputs[f"{use_graphs}-{index}"] for index in range(len(prompts))])
    same = sum(a == b for a, b in zip(*results))
    print(f"graphs == eager: {same}/{len(prompts)}  switches {sys.argv[1:]}", flush=True)


if __name__ == "__main__":
    main()
