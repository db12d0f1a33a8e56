"""One GPU call: the fp8 cache's decode with the in-register convert (``fp8_asm``) checked and timed.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/fp8_decode_check.py [out.json]
(1) workload 2's decode step shape (one Qwen3-0.6B layer, 256 sequences x 1k context), graph-timed: bf16 cache,
    fp8 through ``.to()`` (bf16 dots), fp8 with fp16 dots, fp8 with ``fp8_asm``; each fp8 output against a float32
    attention over the dequantised cache;
(2) workload 2 end to end (engine_bench.py's), bf16 cache, then fp8 with ``fp8_asm`` off and on.
Why: the fp8 path loaded its value tiles from shared memory byte by byte (ptx: 128 ``ld.shared.b8`` a tile) and
ran no faster than bf16 at half the bytes.
"""

from __future__ import annotations

import sys
import time

import torch

import joule.kernels.paged_decode as paged_decode
from decode_sweep import graph_ms, make_inputs  # beside this script
from engine_bench import build, release, throughput
from joule.bench.workload import uniform_length_workload
from joule.kernels.reference import paged_attention_reference
from joule.perf.json_files import write_json

QWEN3_06B = "benchmarks/configs/qwen3-0.6b"


def float32_attention(query, keys, values, tables, lengths, rows=8) -> torch.Tensor:
    """The reference attention (joule.kernels.reference) of the first ``rows`` decode rows, in float32."""
    length_list = [int(length) for length in lengths[:rows]]
    return paged_attention_reference(query[:rows], keys, values, tables[:rows], [1] * rows, length_list,
                                     query.shape[-1] ** -0.5, compute_dtype=torch.float32)


def kernel_rows() -> list[dict]:
    rows = []
    for cache_dtype, launch in ((torch.bfloat16, {}), (torch.float8_e4m3fn, {"fp8_asm": False}),
                                (torch.float8_e4m3fn, {"fp8_asm": False, "fp16_dot": True}),
                                (torch.float8_e4m3fn, {"fp8_asm": True})):
        query, keys, values, tables, lengths = make_inputs(256, 1024, 16, 8, 128, cache_dtype)
        output = torch.empty_like(query)
        try:
            milliseconds = graph_ms(lambda: paged_decode.paged_decode_attention(
                query, keys, values, tables, lengths, 1024, 128**-0.5, num_splits=1, output=output, launch=launch))
            error = (output[:8].float() - float32_attention(query, keys, values, tables, lengths)).abs().max().item()
        except Exception as failure:  # noqa: BLE001 - a variant that fails must not cost the others
            rows.append(dict(cache=str(cache_dtype), launch=launch, error=repr(failure)[:300]))
            print(rows[-1], flush=True)
            continue
        kv_bytes = 2 * 256 * 1024 * 8 * 128 * keys.element_size()
        rows.append(dict(cache=str(cache_dtype), launch=launch, us=milliseconds * 1e3,
                         gbps=kv_bytes / milliseconds / 1e6, max_abs_error_vs_float32=error))
        print(f"{str(cache_dtype):22s} {str(launch):40s} {milliseconds * 1e3:7.1f} us {rows[-1]['gbps']:6.0f} GB/s"
              f"  max|err| vs float32 {error:.4f}", flush=True)
        del query, keys, values
        torch.cuda.empty_cache()
    return rows


def engine_rows() -> list[dict]:
    rows = []
    native = paged_decode.native_fp8_convert
    for label, kv_dtype, asm in (("bf16 KV", "auto", None), ("fp8 KV, .to()", "fp8", False),
                                 ("fp8 KV, fp8_asm", "fp8", True)):
        paged_decode.native_fp8_convert = native if asm is not False else (lambda device: False)
        engine = None
        try:
            engine, graphs, _ = build(QWEN3_06B, dtype="bfloat16", max_model_len=4096, kv_cache_dtype=kv_dtype)
            engine.core.step_observer = None
            requests = uniform_length_workload(256, 100, 1024, engine.model_config.vocab_size, seed=0)
            result = throughput(engine, requests)
        except Exception as failure:  # noqa: BLE001 - report, then the next row
            rows.append(dict(label=label, error=repr(failure)[:300]))
            print(rows[-1], flush=True)
            engine = None
            release()
            continue
        finally:
            paged_decode.native_fp8_convert = native
        result.update(label=label, graphs=graphs)
        rows.append(result)
        print(f"workload 2, {label:18s} {result['output_tok_per_s']:8.0f} output tok/s ({result['seconds']:.2f} s, "
              f"graphs {graphs})", flush=True)
        engine = None
        release()
    return rows


def main() -> None:
    started = time.perf_counter()
    raw = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernel_rows()}
    raw["engine"] = engine_rows()
    print(f"total {time.perf_counter() - started:.0f} s")
    if len(sys.argv) > 1:
        write_json(sys.argv[1], raw, indent=1)


if __name__ == "__main__":
    main()
