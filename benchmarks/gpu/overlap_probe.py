"""Do a decode step and a prompt chunk overlap when replayed on two CUDA streams? (one GPU call, ~1 minute)

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/overlap_probe.py [--partition] [out.json]
Why: workload 3's decode steps are memory-bound (attention at ~2.7 TB/s, tensor cores idle) and its prompt steps
compute-bound (GEMMs at ~690 TFLOP/s); run one after the other they add up (docs/benchmarks.md (j): ~81 % of a
rough floor). If the GPU runs a decode step beside a prompt chunk of other requests at close to the slower of the
two, a scheduler that spreads the prompts over the decode steps could take up to ~30 % off the run; if the
kernels only time-slice, it cannot. This measures that before any engine change.
What: Llama-3.2-1B's 16 layers with one set of weights (shared by both, as in one engine): a decode step of 256 rows
(q/k/v, attention over 576 cached tokens each, o, gate/up + SiLU, down; cuBLAS and the engine's kernels) and a
prompt chunk of N rows (the same GEMMs and prefill attention over its own N tokens), each captured in a CUDA graph,
timed alone and both replayed at once on two streams. Prints alone / together / their sum and max, and the overlap
(the share of the shorter one hidden). Result (H100, 2026-12-06 (j)): 4-26 % hidden; the kernels take turns.
``--partition``: whether leaving processors free helps: 16 layers' fused gate/up + SiLU GEMMs of a 1k-2k-row prompt
chunk as persistent kernels of P programs (one an SM) beside 16 layers' decode attention of the 256-row step, P from
all processors down to half.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import capture_graph as capture  # noqa: E402

from joule.kernels.activation import silu_and_mul  # noqa: E402
from joule.kernels.common import processor_count  # noqa: E402
from joule.kernels.gate_up_silu import gate_up_silu  # noqa: E402
from joule.kernels.paged_decode import paged_decode_attention  # noqa: E402
from joule.kernels.paged_prefill import build_tiles, paged_prefill_attention, rows_per_tile  # noqa: E402
from joule.runtime.attention.base import KVCache  # noqa: E402

LAYERS, HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 16, 2048, 8192, 32, 8, 64
DECODE_ROWS, CONTEXT, BLOCK = 256, 576, 16


def decode_cache(device: torch.device, generator: torch.Generator, spare_blocks: int = 0):
    """A random one-layer cache holding the decode step's 256 x 576 tokens over shuffled blocks (and
    ``spare_blocks`` more after them), its block tables, lengths and the first spare block."""
    blocks_each = -(-CONTEXT // BLOCK)
    used = DECODE_ROWS * blocks_each
    cache = KVCache.allocate(1, used + spare_blocks, BLOCK, KV_HEADS, HEAD_DIM, torch.bfloat16, device)
    keys, values = cache.key_caches[0], cache.value_caches[0]
    keys.normal_(generator=generator)
    values.normal_(generator=generator)
    tables = torch.randperm(used, device=device, generator=generator).view(DECODE_ROWS, blocks_each).to(torch.int32)
    lengths = torch.full((DECODE_ROWS,), CONTEXT, dtype=torch.int32, device=device)
    return keys, values, tables, lengths, used


def timed(replays, streams, repeats: int = 7) -> float:
    """Median ms for replaying every graph of ``replays`` on its stream, all started together."""
    times = []
    main = torch.cuda.current_stream()
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        for graph, stream in zip(replays, streams):
            stream.wait_event(start)
            with torch.cuda.stream(stream):
                graph.replay()
        for stream in streams:
            main.wait_stream(stream)
        end.record(main)
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def partition_probe(device: torch.device) -> dict:
    """Persistent fused gate/up GEMMs on P processors beside decode attention on the rest (see the module doc)."""
    generator = torch.Generator(device=device).manual_seed(1)
    weights = [torch.randn(2 * INTERMEDIATE, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator) * 0.02
               for _ in range(LAYERS)]
    keys, values, tables, lengths, _ = decode_cache(device, generator)
    query = torch.randn(DECODE_ROWS, HEADS, HEAD_DIM, device=device, dtype=torch.bfloat16, generator=generator)

    def attention():
        for _ in range(LAYERS):
            paged_decode_attention(query, keys, values, tables, lengths, CONTEXT, HEAD_DIM**-0.5)

    attention_graph = capture(attention)
    stream_a, stream_b = torch.cuda.Stream(), torch.cuda.Stream()
    attention_ms = timed([attention_graph], [stream_b])
    print(f"partition: decode attention alone (16 layers, {DECODE_ROWS} x {CONTEXT}): {attention_ms:.3f} ms",
          flush=True)
    processors = processor_count(device)
    rows_out = []
    for rows in (1024, 2048):
        hidden = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator)
        for programs in sorted({processors, processors * 7 // 8, processors * 3 // 4, processors * 5 // 8,
                                processors // 2}, reverse=True):
            gemm_graph = capture(lambda programs=programs: [gate_up_silu(hidden, weight, max_programs=programs)
                                                            for weight in weights])
            gemm_ms = timed([gemm_graph], [stream_a])
            together_ms = timed([gemm_graph, attention_graph], [stream_a, stream_b])
            hidden_share = (gemm_ms + attention_ms - together_ms) / min(gemm_ms, attention_ms)
            rows_out.append(dict(rows=rows, programs=programs, gemm_ms=gemm_ms, attention_ms=attention_ms,
                                 together_ms=together_ms, overlap=hidden_share))
            print(f"partition: {rows:5d} rows, GEMMs on {programs:3d} programs: alone {gemm_ms:6.3f} ms, with the "
                  f"attention {together_ms:6.3f} ms (serial {gemm_ms + attention_ms:6.3f}): "
                  f"{100 * hidden_share:5.1f} % of the shorter hidden", flush=True)
            del gemm_graph
    return {"attention_ms": attention_ms, "rows": rows_out}


def main() -> None:
    arguments = [argument for argument in sys.argv[1:] if argument != "--partition"]
    out_path = arguments[0] if arguments else None
    device = torch.device("cuda")
    if "--partition" in sys.argv:
        results = partition_probe(device)
        if out_path:
            with open(out_path, "w") as handle:
                json.dump(results, handle, indent=1)
        return
    generator = torch.Generator(device=device).manual_seed(0)

    def weight(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, device=device, dtype=torch.bfloat16, generator=generator) * 0.02

    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    layers = [(weight(qkv_rows, HIDDEN), weight(HIDDEN, HEADS * HEAD_DIM), weight(2 * INTERMEDIATE, HIDDEN),
               weight(HIDDEN, INTERMEDIATE)) for _ in range(LAYERS)]
    keys, values, tables, lengths, first_free_block = decode_cache(device, generator, spare_blocks=4096 // BLOCK)
    decode_in = torch.randn(DECODE_ROWS, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator)

    def layer(hidden, qkv_weight, o_weight, gate_up_weight, down_weight, attend):
        qkv = F.linear(hidden, qkv_weight)
        query = qkv[:, :HEADS * HEAD_DIM].reshape(-1, HEADS, HEAD_DIM)
        attended = attend(query.contiguous())
        hidden = F.linear(attended.reshape(-1, HEADS * HEAD_DIM), o_weight)
        return F.linear(silu_and_mul(F.linear(hidden, gate_up_weight)), down_weight)

    def decode_step():
        hidden = decode_in
        for weights in layers:
            hidden = layer(hidden, *weights, lambda query: paged_decode_attention(
                query, keys, values, tables, lengths, CONTEXT, HEAD_DIM**-0.5))

    results = {"decode_rows": DECODE_ROWS, "context": CONTEXT, "chunks": []}
    decode_graph = capture(decode_step)
    stream_a, stream_b = torch.cuda.Stream(), torch.cuda.Stream()
    decode_ms = timed([decode_graph], [stream_a])
    results["decode_ms"] = decode_ms
    print(f"decode step alone ({DECODE_ROWS} rows x {CONTEXT} tokens, 16 layers): {decode_ms:.3f} ms", flush=True)
    for rows in (512, 1024, 2048, 4096):
        prompt_in = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, generator=generator)
        prompt_blocks = -(-rows // BLOCK)
        prompt_table = torch.arange(first_free_block, first_free_block + prompt_blocks, device=device,
                                    dtype=torch.int32).view(1, -1)
        starts = torch.tensor([0, rows], dtype=torch.int32, device=device)
        prompt_lengths = torch.tensor([rows], dtype=torch.int32, device=device)
        tiles = build_tiles([rows], [rows], rows_per_tile(HEADS // KV_HEADS, HEAD_DIM, torch.bfloat16), device)

        def prompt_chunk(prompt_in=prompt_in, prompt_table=prompt_table, starts=starts, prompt_lengths=prompt_lengths,
                         tiles=tiles):
            hidden = prompt_in
            for weights in layers:
                hidden = layer(hidden, *weights, lambda query: paged_prefill_attention(
                    query, keys, values, prompt_table, starts, prompt_lengths, HEAD_DIM**-0.5, tiles=tiles))

        prompt_graph = capture(prompt_chunk)
        prompt_ms = timed([prompt_graph], [stream_b])
        together_ms = timed([decode_graph, prompt_graph], [stream_a, stream_b])
        serial_ms = decode_ms + prompt_ms
        hidden_share = (serial_ms - together_ms) / min(decode_ms, prompt_ms)
        row = dict(prompt_rows=rows, prompt_ms=prompt_ms, together_ms=together_ms, serial_ms=serial_ms,
                   max_ms=max(decode_ms, prompt_ms), overlap=hidden_share)
        results["chunks"].append(row)
        print(f"prompt chunk {rows:5d} rows: alone {prompt_ms:7.3f} ms; with the decode step on another stream "
              f"{together_ms:7.3f} ms (serial {serial_ms:7.3f}, max {row['max_ms']:7.3f}): "
              f"{100 * hidden_share:5.1f} % of the shorter hidden", flush=True)
        del prompt_graph
    if out_path:
        with open(out_path, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
