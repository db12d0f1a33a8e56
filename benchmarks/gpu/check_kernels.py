"""One GPU run: every Triton kernel against its torch reference, then timings.

    PYTHONPATH=. python benchmarks/gpu/check_kernels.py           # on the GPU machine
    TRITON_INTERPRET=1 python benchmarks/gpu/check_kernels.py --smoke   # tiny sizes on CPU, to test the script

Prints a correctness table (max abs error, ||out - ref|| / ||ref|| against float64
references; outputs poisoned with NaN first), a small launch-config sweep, then
timings against the portable backend with achieved bandwidth for decode. Raw
numbers go to $OUT/check_kernels.json when OUT is set.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from joule.kernels.kv_write import write_kv_cache  # noqa: E402
from joule.kernels.paged_decode import choose_num_splits, paged_decode_attention  # noqa: E402
from joule.kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from joule.kernels.reference import (  # noqa: E402
    paged_attention_reference, rms_norm_reference, write_kv_cache_reference,
)
from joule.kernels.rms_norm import rms_norm  # noqa: E402
from joule.kernels.activation import silu_and_mul  # noqa: E402
from joule.kernels.reference import rotary_reference, silu_and_mul_reference  # noqa: E402
from joule.kernels.rotary import rotary_embedding_  # noqa: E402
from joule.kernels.sample_rows import draw_uniforms, reference_sample_rows, sample_rows, signed_seeds  # noqa: E402
from joule.runtime.attention.base import AttentionMetadata, KVCache  # noqa: E402
from joule.runtime.attention.portable import PortableAttentionBackend  # noqa: E402
from joule.runtime.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from joule.runtime.sampler import Sampler, SamplingRow, mix_seed  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LIMITS = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 2e-3}  # on ||err|| / ||ref||
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def make_batch(steps, heads, kv_heads, head_dim, block_size, dtype, seed):
    """Random paged batch (noise cache, shuffled blocks, one padded table column) for (context, new) steps."""
    generator = torch.Generator(device=DEVICE).manual_seed(seed)
    contexts = np.array([c for c, _ in steps]); news = np.array([q for _, q in steps])
    blocks_per_sequence = -(-(contexts + news) // block_size)
    num_blocks = int(blocks_per_sequence.sum()) + 8
    shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator, device=DEVICE, dtype=dtype)
    value_cache = torch.randn(shape, generator=generator, device=DEVICE, dtype=dtype)
    order = np.random.default_rng(seed).permutation(num_blocks)
    tables = np.zeros((len(steps), int(blocks_per_sequence.max()) + 1), dtype=np.int32)
    slots, used = [], 0
    for index, (context, new) in enumerate(steps):
        table = order[used: used + blocks_per_sequence[index]]
        used += blocks_per_sequence[index]
        tables[index, : len(table)] = table
        positions = np.arange(context, context + new)
        slots.append(table[positions // block_size] * block_size + positions % block_size)
    num_tokens = int(news.sum())
    metadata = AttentionMetadata(
        query_start_locations=torch.tensor(np.concatenate([[0], np.cumsum(news)]), device=DEVICE),
        slot_mapping=torch.tensor(np.concatenate(slots), dtype=torch.int64, device=DEVICE),
        block_tables=torch.tensor(tables, device=DEVICE),
        query_lengths=news.tolist(), context_lengths=contexts.tolist(), sequence_lengths=(contexts + news).tolist(),
    )

    def rows(count):
        return torch.randn(num_tokens, count, head_dim, generator=generator, device=DEVICE, dtype=dtype) + 0.25

    return dict(query=rows(heads), key=rows(kv_heads), value=rows(kv_heads),
                cache=KVCache([key_cache], [value_cache], block_size), metadata=metadata)


def reference(batch, scale, chunk=1024):
    """float64 attention; long prompts are split into row chunks (same block table) to bound memory."""
    metadata = batch["metadata"]
    query_lengths, sequence_lengths, table_rows = [], [], []
    for index, (new, length) in enumerate(zip(metadata.query_lengths, metadata.sequence_lengths)):
        for start in range(0, new, chunk):
            rows = min(chunk, new - start)
            query_lengths.append(rows)
            sequence_lengths.append(length - new + start + rows)
            table_rows.append(index)
    cache = batch["cache"]
    tables = metadata.block_tables[torch.tensor(table_rows, device=DEVICE)]
    return paged_attention_reference(batch["query"], cache.key_caches[0], cache.value_caches[0], tables,
                                     query_lengths, sequence_lengths, scale)


def compare(rows, kernel, dtype, case, actual, expected, exact=False):
    actual, expected = actual.double(), expected.double()
    finite = bool(torch.isfinite(actual).all())
    max_abs = (actual - expected).abs().max().item() if finite else float("nan")
    relative = ((actual - expected).norm() / expected.norm()).item() if finite else float("nan")
    passed = finite and (max_abs == 0 if exact else relative < LIMITS[dtype])
    rows.append(dict(kernel=kernel, dtype=SHORT[dtype], case=case, max_abs=max_abs, rel=relative, ok=passed))
    print(f"  {kernel:8} {SHORT[dtype]} {case:44} max|err| {max_abs:9.2e}  rel {relative:9.2e}  "
          f"{'PASS' if passed else 'FAIL'}", flush=True)


def poisoned(query):
    return torch.full_like(query, float("nan"))


def correctness(scale_down):
    rows = []
    heads, kv_heads, dim = (32, 8, 64) if not scale_down else (8, 2, 32)
    scale = dim**-0.5
    processors = processor_count()
    rng = np.random.default_rng(0)
    top, low = (8192, 127) if not scale_down else (300, 5)
    decode_cases = [
        ("B=1 ctx=8192 auto splits", [(top - 1, 1)], 16, None),
        ("B=1 ctx=8192 one split", [(top - 1, 1)], 16, 1),
        ("B=16 ctx 128..8192", [(int(c), 1) for c in rng.integers(low, top, 16)], 16, None),
        ("B=64 ctx 128..8192 bs=32", [(int(c), 1) for c in rng.integers(low, top, 64)], 32, None),
        ("B=256 ctx 128..2048", [(int(c), 1) for c in rng.integers(low, top // 4, 256 if not scale_down else 8)],
         16, None),
    ]
    prefill_cases = [
        ("1 x 8192 fresh prompt", [(0, top)], 16),
        ("4 chunks mid-seq + 32 decodes", [(1000, 512), (0, 1024), (top // 2, 256), (130, 77)]
         + [(int(c), 1) for c in rng.integers(low, top // 2, 32)], 16),
        ("prefix-hit tails bs=32", [(2048, 300), (512, 1500), (96, 33)], 32),
    ]
    if scale_down:
        prefill_cases = [(name, [(min(c, 200), min(q, 150)) for c, q in steps[:6]], bs)
                         for name, steps, bs in prefill_cases]
    for dtype in (torch.bfloat16, torch.float32):
        for index, (name, steps, block_size, splits) in enumerate(decode_cases):
            batch = make_batch(steps, heads, kv_heads, dim, block_size, dtype, seed=index)
            expected = reference(batch, scale)
            cache, metadata = batch["cache"], batch["metadata"]
            if splits is None:
                splits = choose_num_splits(len(steps), kv_heads, metadata.max_sequence_length, processors)
            lengths = torch.tensor(metadata.sequence_lengths, dtype=torch.int32, device=DEVICE)
            output = paged_decode_attention(batch["query"], cache.key_caches[0], cache.value_caches[0],
                                            metadata.block_tables, lengths, metadata.max_sequence_length, scale,
                                            num_splits=splits, output=poisoned(batch["query"]))
            compare(rows, "decode", dtype, f"{name} ({splits} splits)", output, expected)
        for index, (name, steps, block_size) in enumerate(prefill_cases):
            batch = make_batch(steps, heads, kv_heads, dim, block_size, dtype, seed=10 + index)
            expected = reference(batch, scale)
            cache, metadata = batch["cache"], batch["metadata"]
            lengths = torch.tensor(metadata.sequence_lengths, dtype=torch.int32, device=DEVICE)
            output = paged_prefill_attention(
                batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
                metadata.query_start_locations, lengths, scale, query_lengths=metadata.query_lengths,
                host_sequence_lengths=metadata.sequence_lengths, output=poisoned(batch["query"]))
            compare(rows, "prefill", dtype, name, output, expected)
        # KV write: exact copy, strided inputs split from one merged tensor, one padding slot
        batch = make_batch([(100, 8192 if not scale_down else 64)], heads, kv_heads, dim, 16, dtype, seed=20)
        cache, slots = batch["cache"], batch["metadata"].slot_mapping.clone()
        slots[5] = -1
        merged = torch.cat([batch["key"], batch["value"]], dim=1)
        key, value = merged[:, :kv_heads], merged[:, kv_heads:]
        keys, values = cache.key_caches[0].clone(), cache.value_caches[0].clone()
        write_kv_cache_reference(key, value, keys, values, slots)
        write_kv_cache(key, value, cache.key_caches[0], cache.value_caches[0], slots)
        compare(rows, "kv_write", dtype, "8192 rows, strided, 1 padding slot",
                torch.cat([cache.key_caches[0], cache.value_caches[0]]), torch.cat([keys, values]), exact=True)
        # fused RMSNorm (+ residual), Llama-3.2-1B width
        width = 2048 if not scale_down else 128
        generator = torch.Generator(device=DEVICE).manual_seed(30)
        hidden, residual = (torch.randn(2, 8192 if not scale_down else 16, width, generator=generator,
                                        device=DEVICE, dtype=dtype) * 2)
        weight = 1 + 0.1 * torch.randn(width, generator=generator, device=DEVICE, dtype=dtype)
        output, new_residual = rms_norm(hidden, weight, 1e-5, residual)
        want, want_residual = rms_norm_reference(hidden.double(), weight.double(), 1e-5, residual.double())
        compare(rows, "rms_norm", dtype, "8192 x 2048 + residual", torch.cat([output, new_residual]),
                torch.cat([want, want_residual]))
        # rotary with Qwen3's q/k norm, in place on strided views of one fused qkv output
        tokens = 4096 if not scale_down else 8
        fused = torch.randn(tokens, (16 + 2 * 8) * 128, generator=generator, device=DEVICE, dtype=dtype) * 2
        query = fused[:, : 16 * 128].view(tokens, 16, 128)
        key = fused[:, 16 * 128 : 24 * 128].view(tokens, 8, 128)
        angles = torch.rand(tokens, 64, generator=generator, device=DEVICE) * 100
        norms = [1 + 0.1 * torch.randn(128, generator=generator, device=DEVICE, dtype=dtype) for _ in range(2)]
        want_query, want_key = rotary_reference(query, key, angles.cos(), angles.sin(), *norms)
        rotary_embedding_(query, key, angles.cos(), angles.sin(), *norms)
        compare(rows, "rotary+qk_norm", dtype, f"{tokens} tokens, 16+8 heads x 128",
                torch.cat([query.reshape(tokens, -1), key.reshape(tokens, -1)], 1),
                torch.cat([want_query.reshape(tokens, -1), want_key.reshape(tokens, -1)], 1))
        gate_up = torch.randn(tokens, 2 * 8192, generator=generator, device=DEVICE, dtype=dtype) * 3
        compare(rows, "silu_and_mul", dtype, f"{tokens} x 2 x 8192", silu_and_mul(gate_up),
                silu_and_mul_reference(gate_up))
        # the fused temperature race: its tokens against the torch race on the same Philox uniforms
        vocab = 128256 if not scale_down else 1000
        logits = torch.randn(4, vocab, generator=generator, device=DEVICE, dtype=dtype) * 3
        seeds, inverse, noise_on = sample_arguments(4)
        compare(rows, "sample", dtype, f"4 x {vocab}: T 0.8 / 1 / greedy / 2, tokens",
                sample_rows(logits, seeds, inverse, noise_on).float(),
                reference_sample_rows(logits, draw_uniforms(seeds, vocab), inverse, noise_on).float(), exact=True)
        # whole backend against the portable one on a mixed batch
        steps = [(int(c), 1) for c in rng.integers(1, top // 2, 48)] + [(0, 700), (1500, 300), (33, 64)]
        outputs = []
        for backend in (PortableAttentionBackend(), TritonAttentionBackend()):
            batch = make_batch(steps, heads, kv_heads, dim, 16, dtype, seed=40)
            outputs.append(backend.forward(0, batch["query"], batch["key"], batch["value"], batch["cache"],
                                           batch["metadata"], scale))
        compare(rows, "backend", dtype, "triton vs portable: 48 decodes + 3 chunks", outputs[1], outputs[0])
    return rows


def sample_arguments(rows: int):
    """Per-row kernel arguments cycling through T=0.8 (seeded), T=1, greedy and T=2."""
    temperatures = [(0.8, 1.0, 0.0, 2.0)[row % 4] for row in range(rows)]
    seeds = signed_seeds([mix_seed(row, 3) for row in range(rows)])
    return (torch.tensor(seeds, dtype=torch.int64, device=DEVICE),
            torch.tensor([1.0 / t if t else 1.0 for t in temperatures], dtype=torch.float32, device=DEVICE),
            torch.tensor([int(t != 0) for t in temperatures], dtype=torch.int32, device=DEVICE))


def sampling_timings(rows_out):
    """Sampling B rows of a 128k vocabulary at T=0.8: the fused kernels against the sampler's torch race."""
    for batch in (1, 64, 256):
        batch = small(batch, 16)
        logits = torch.randn(batch, small(128256, 64), device=DEVICE, dtype=torch.bfloat16)
        seeds, inverse, noise_on = sample_arguments(batch)
        inverse.fill_(1 / 0.8)
        noise_on.fill_(1)
        rows = [SamplingRow(temperature=0.8, seed=row) for row in range(batch)]
        torch_sampler = Sampler(0, DEVICE, fused=False)
        fused_ms = bench(lambda: sample_rows(logits, seeds, inverse, noise_on))
        torch_ms = bench(lambda: torch_sampler.sample_on_device(logits, rows))
        rows_out.append(dict(what=f"sample T=0.8 B={batch} x {logits.shape[1]}", triton_ms=fused_ms,
                             graph_ms=graph_ms(lambda: sample_rows(logits, seeds, inverse, noise_on)),
                             portable_ms=torch_ms, rate="portable = the sampler's torch race, eager"))
        print(rows_out[-1], flush=True)


SMOKE = {"on": False}  # --smoke: tiny sizes, plain timers, no graphs (checks the script itself on CPU)


def small(count, divisor=32, least=1):
    """A size, shrunk in smoke runs."""
    return max(least, count // divisor) if SMOKE["on"] else count


def processor_count():
    return torch.cuda.get_device_properties(DEVICE).multi_processor_count if DEVICE.type == "cuda" else 4


def bench(function):
    if DEVICE.type != "cuda":
        import time

        started = time.perf_counter()
        function()
        return (time.perf_counter() - started) * 1e3
    import triton.testing

    return triton.testing.do_bench(function, warmup=10, rep=50, return_mode="median")  # ms


def copy_bandwidth():
    source = torch.randn(small(256 << 20, 4096), device=DEVICE, dtype=torch.float32)  # 1 GiB
    target = torch.empty_like(source)
    milliseconds = bench(lambda: target.copy_(source))
    return 2 * source.numel() * 4 / milliseconds / 1e6  # GB/s, read + write


def decode_bytes(batch):
    cache, metadata = batch["cache"], batch["metadata"]
    per_token = 2 * cache.key_caches[0][0, 0].numel() * cache.key_caches[0].element_size()
    return sum(metadata.sequence_lengths) * per_token + 2 * batch["query"].numel() * batch["query"].element_size()


def graph_ms(function, repeats=10):
    """Median GPU time of one call, from a CUDA graph of ``repeats`` calls (no Python launch cost)."""
    if DEVICE.type != "cuda":
        return bench(function)
    from joule.runtime.graph_timing import repeated_graph

    function()
    graph = repeated_graph(function, repeats)
    return bench(graph.replay) / repeats


def decode_inputs(batch_size, context, seed):
    batch = make_batch([(small(context) - 1, 1)] * small(batch_size, 16), 32, 8, 64, 16, torch.bfloat16, seed=seed)
    lengths = torch.tensor(batch["metadata"].sequence_lengths, dtype=torch.int32, device=DEVICE)
    return batch, lengths


def sweep(results):
    """Decode split factors (graph-timed) and a few prefill launch configs, bf16."""
    scale, rows = 0.125, []
    processors = processor_count()
    for batch_size, context in ((1, 8192), (16, 4096), (64, 1024), (256, 1024)):
        batch, lengths = decode_inputs(batch_size, context, seed=50)
        cache, metadata = batch["cache"], batch["metadata"]
        chosen = choose_num_splits(batch_size, 8, context, processors)
        line = []
        for splits in (1, 2, 4, 8, 16, 32):
            milliseconds = graph_ms(lambda: paged_decode_attention(
                batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables, lengths,
                metadata.max_sequence_length, scale, num_splits=splits))
            line.append(f"{splits}:{milliseconds * 1e3:.1f}us")
            rows.append(dict(batch=batch_size, context=context, splits=splits, ms=milliseconds))
        print(f"decode B={batch_size} ctx={context} (heuristic {chosen} splits):", " ".join(line), flush=True)
        del batch, cache
    results["decode_split_sweep"] = rows
    batch = make_batch([(0, small(8192))], 32, 8, 64, 16, torch.bfloat16, seed=51)
    cache, metadata = batch["cache"], batch["metadata"]
    lengths = torch.tensor(metadata.sequence_lengths, dtype=torch.int32, device=DEVICE)
    timings = []
    for block_m, block_n, warps, stages in ((128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 3), (128, 128, 4, 3),
                                            (64, 64, 4, 3), (128, 32, 4, 3)):
        launch = dict(block_m=block_m, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            milliseconds = bench(lambda: paged_prefill_attention(
                batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
                metadata.query_start_locations, lengths, scale, query_lengths=metadata.query_lengths,
                host_sequence_lengths=metadata.sequence_lengths, launch=launch))
        except Exception as error:  # e.g. out of shared memory
            print("  prefill config failed", launch, type(error).__name__)
            continue
        timings.append((milliseconds, launch))
    timings.sort(key=lambda item: item[0])
    flops = 4 * 8192 * 8192 / 2 * 32 * 64
    print("prefill 1x8192 bf16 configs:", [(f"{t:.3f}ms {flops / t / 1e9:.0f}TFLOP/s", c) for t, c in timings],
          flush=True)
    results["prefill_sweep"] = timings


def timings(results, bandwidth):
    """One layer's attention through each backend, bf16; graph = the Triton backend replayed in a CUDA graph."""
    rows, scale = [], 0.125
    cases = [(f"decode B={b} ctx={c}", [(c - 1, 1)] * b) for b, c in
             ((1, 8192), (64, 1024), (64, 4096), (256, 1024), (256, 4096))]
    cases += [("mixed 64 dec ctx4k + 2048 chunk", [(4095, 1)] * 64 + [(0, 2048)]),
              ("prefill 1x8192", [(0, 8192)]), ("prefill 8x1024", [(0, 1024)] * 8),
              ("extend 2048 rows after 6144 cached", [(6144, 2048)])]
    for what, steps in cases:
        steps = [(small(c), small(q)) for c, q in steps[: small(len(steps), 16)]]
        batch = make_batch(steps, 32, 8, 64, 16, torch.bfloat16, seed=60)
        args = (batch["query"], batch["key"], batch["value"], batch["cache"], batch["metadata"], scale)
        triton_backend, portable = TritonAttentionBackend(), PortableAttentionBackend()
        triton_ms = bench(lambda: triton_backend.forward(0, *args))
        graph = graph_ms(lambda: triton_backend.forward(0, *args))
        portable_ms = bench(lambda: portable.forward(0, *args))
        if what.startswith("decode"):
            achieved = decode_bytes(batch) / graph / 1e6
            rate = f"{achieved:.0f} GB/s in graph ({100 * achieved / bandwidth:.0f}% of copy)"
        else:
            flops = sum(4 * q * (c + (q + 1) / 2) * 32 * 64 for c, q in steps)
            rate = f"{flops / graph / 1e9:.0f} TFLOP/s in graph (causal)"
        rows.append(dict(what=what, triton_ms=triton_ms, graph_ms=graph, portable_ms=portable_ms, rate=rate))
        print(rows[-1], flush=True)
        del batch, args
    hidden, residual = torch.randn(2, small(8192), 2048, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(2048, device=DEVICE, dtype=torch.bfloat16)
    fused_ms = bench(lambda: rms_norm(hidden, weight, 1e-5, residual))
    torch_ms = bench(lambda: rms_norm_reference(hidden, weight, 1e-5, residual))
    moved = 5 * hidden.numel() * 2
    rows.append(dict(what="rms_norm+residual 8192x2048", triton_ms=fused_ms, graph_ms=graph_ms(
        lambda: rms_norm(hidden, weight, 1e-5, residual)), portable_ms=torch_ms,
        rate=f"{moved / fused_ms / 1e6:.0f} GB/s eager"))
    sampling_timings(rows)
    results["timings"] = rows
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, plain timers (CPU interpreter)")
    parser.add_argument("--no-sweep", action="store_true")
    options = parser.parse_args()
    import triton

    SMOKE["on"] = options.smoke
    name = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu (interpreter)"
    print(f"device {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    results = {"device": name, "torch": torch.__version__, "triton": triton.__version__}
    print("correctness (Llama-3.2-1B attention shape: 32 q heads, 8 kv heads, head_dim 64):", flush=True)
    results["correctness"] = correctness(options.smoke)
    table = []
    bandwidth = copy_bandwidth()
    results["copy_GBps"] = bandwidth
    print(f"device-to-device copy: {bandwidth:.0f} GB/s (read + write)", flush=True)
    if not options.no_sweep:
        sweep(results)
    table = timings(results, bandwidth)
    if os.environ.get("OUT"):
        pathlib.Path(os.environ["OUT"], "check_kernels.json").write_text(json.dumps(results, indent=1, default=str))
    print(f"\n=== {name}: correctness vs float64 reference (rel = ||out-ref||/||ref||) ===")
    for row in results["correctness"]:
        print(f"{row['kernel']:8} {row['dtype']} {row['case']:48} max|err| {row['max_abs']:9.2e} "
              f"rel {row['rel']:9.2e} {'PASS' if row['ok'] else 'FAIL'}")
    if table:
        print(f"\n=== timings, bf16, one layer (copy bandwidth {results['copy_GBps']:.0f} GB/s) ===")
        print(f"{'what':36} {'triton ms':>9} {'graph ms':>9} {'portable ms':>11} {'speedup':>7}  rate")
        for row in table:
            print(f"{row['what']:36} {row['triton_ms']:9.3f} {row['graph_ms']:9.3f} {row['portable_ms']:11.3f} "
                  f"{row['portable_ms'] / row['triton_ms']:6.1f}x  {row['rate']}")
        print("speedup = portable / triton, both eager; graph = Triton backend replayed in a CUDA graph")
    failures = [row for row in results["correctness"] if not row["ok"]]
    print(f"\n{len(results['correctness']) - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
