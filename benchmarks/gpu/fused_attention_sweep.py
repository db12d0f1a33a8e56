"""Launch shapes of the fused batch-1 attention + o projection kernel, and the unfused path, by context length.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/fused_attention_sweep.py [out.json]
Llama-3.2-1B shape (32 query / 8 KV heads of 64, hidden 2,048), bf16, 16 layers each with its own cache and W_o
(128 MiB of weights: more than L2, as in a model), one CUDA graph of the 16 layers' launches per shape and context,
replayed back to back: microseconds per layer. The unfused rows are what the engine runs otherwise: split-K
attention (the graphs' split choice and 32-token minimum), its merge, and the o projection GEMV. Why: in the
engine (short_context_sweep.py --fused, H100 2026-12-05 (d)) the fused kernel saved 48 us a step at 64 tokens
of context and cost 89 us at 768; its whole-context loop runs ~2 us a 128-token tile.
"""

from __future__ import annotations

import itertools
import json
import sys

sys.path.insert(0, "benchmarks/gpu")
import torch  # noqa: E402
from short_context_sweep import replay_seconds  # noqa: E402

from joule.kernels.attention_output import decode_attention_output  # noqa: E402
from joule.kernels.gemv import gemv  # noqa: E402
from joule.kernels.paged_decode import choose_num_splits, paged_decode_attention  # noqa: E402

CONTEXTS = (64, 128, 256, 384, 512, 768, 1024)
LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN, BLOCK = 16, 32, 8, 64, 2048, 16
REPLAYS = 200
FUSED_SHAPES = [dict(block_n=n, num_warps=w, num_stages=s)
                for n, w, s in itertools.product((64, 128, 256), (4, 8), (1, 2, 3))]
FUSED_SHAPES += [dict(block_n=128, num_warps=8, num_stages=2, prefetch=False),
                 dict(block_n=128, num_warps=8, num_stages=2, block_rows=64)]
UNFUSED_SHAPES = [{}, dict(num_splits=1)]


def label(shape: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in shape.items())


def timed_graph(launch_layers) -> float:
    """Microseconds per layer: the 16 launches captured once, replayed back to back."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        launch_layers()  # compile and warm outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            launch_layers()
    return 1e6 * replay_seconds(graph, REPLAYS, warmup=10) / LAYERS


def main(out_path: str | None) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    blocks_per_layer = max(CONTEXTS) // BLOCK + 1
    caches = [(torch.randn(blocks_per_layer, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16),
               torch.randn(blocks_per_layer, BLOCK, KV_HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16))
              for _ in range(LAYERS)]
    weights = [torch.randn(HIDDEN, HEADS * HEAD_DIM, device=device, dtype=torch.bfloat16) / 64 for _ in range(LAYERS)]
    queries = [torch.randn(1, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)]
    table = torch.randperm(blocks_per_layer, device=device).to(torch.int32)
    lengths = torch.zeros(1, dtype=torch.int32, device=device)
    processors = torch.cuda.get_device_properties(device).multi_processor_count
    scale = HEAD_DIM ** -0.5
    attended = [torch.empty(1, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16) for _ in range(LAYERS)]
    table_2d = table[None]
    results: dict[str, dict[int, float]] = {}
    checked = False
    for context in CONTEXTS:
        lengths.fill_(context)
        for shape in UNFUSED_SHAPES:
            shape = dict(shape)
            splits = shape.pop("num_splits", None) or choose_num_splits(1, KV_HEADS, 1024, processors)

            def unfused(shape=shape, splits=splits):
                for layer in range(LAYERS):
                    paged_decode_attention(queries[layer], *caches[layer], table_2d, lengths, 1024, scale,
                                           num_splits=splits, output=attended[layer], min_split_tokens=32,
                                           launch=shape)
                    gemv(attended[layer].view(1, -1), weights[layer])

            name = f"unfused splits={splits} " + label(shape)
            results.setdefault(name, {})[context] = timed_graph(unfused)
        for shape in FUSED_SHAPES:
            scratch: dict = {}

            def fused(shape=shape, scratch=scratch):
                for layer in range(LAYERS):
                    decode_attention_output(queries[layer], *caches[layer], table, lengths, weights[layer], scale,
                                            scratch=scratch, launch=shape)

            name = "fused " + label(shape)
            try:
                if not checked or context == CONTEXTS[-1]:  # a shape that computes wrong is no faster
                    expected = gemv(paged_decode_attention(queries[0], *caches[0], table_2d, lengths, 1024, scale)
                                    .view(1, -1), weights[0]).float()
                    got = decode_attention_output(queries[0], *caches[0], table, lengths, weights[0], scale,
                                                  launch=shape).float()
                    error = ((got - expected).abs().max() / expected.abs().max()).item()
                    if error > 2e-2:
                        raise RuntimeError(f"relative error {error:.3g}")
                results.setdefault(name, {})[context] = timed_graph(fused)
            except Exception as error:  # noqa: BLE001 - a shape that does not compile or fit is reported, not fatal
                results.setdefault(name, {})[context] = float("nan")
                print(name, context, "failed:", repr(error)[:160], flush=True)
        checked = True
        print(f"context {context} done", flush=True)
    print(f"\n{torch.cuda.get_device_name()}: us per layer (graph of {LAYERS} layers, {REPLAYS} replays)")
    print(f"{'shape':>75}" + "".join(f"{context:>8}" for context in CONTEXTS))
    for name, row in sorted(results.items(), key=lambda item: sum(item[1].values())):
        print(f"{name:>75}" + "".join(f"{row.get(context, float('nan')):8.2f}" for context in CONTEXTS))
    if out_path:
        with open(out_path, "w") as file:
            json.dump({"device": torch.cuda.get_device_name(), "us_per_layer": results}, file)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
