"""Batch-1 GEMV blocks timed where they run: 16 layers' q/k/v -> o -> gate/up -> down chained in one CUDA graph.

Usage (GPU machine, repo root): PYTHONPATH=. python benchmarks/gpu/layer_chain_sweep.py [out.json]
Why: ``gemv_sweep.py`` times one projection against copies of itself, but in a decode step each GEMV follows a
different kernel under programmatic dependent launch, and the hop between them is where batch 1 loses its time
(docs/benchmarks.md, the H100 layer table of 2026-12-05 (f)). Llama-3.2-1B shapes, bf16, distinct weights per
layer (~1.9 GB, so they stream from DRAM as in the engine); the q/k/v kernel is the engine's (norm, rotary and
the cache write inside), attention is left out (its output stands in by the queries). The default blocks are
timed several times between the variants (the noise), beside the blocks ``gemv_config`` chose before 2026-12-06 (i)
(``PREVIOUS``), then one projection's blocks at a time. Prints us a layer against the layer's weight bytes at the
copy bandwidth, best first per projection. (2026-12-06 (i), H100: loads kept one or two tiles ahead through the row
gained nothing here and lost 1.8 % at batch 1, 924 against 941 tok/s: not kept.)
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gemv_sweep import timed_graph  # noqa: E402

from joule.bench.latency import copy_bandwidth  # noqa: E402
from joule.runtime.attention.base import KVCache  # noqa: E402
from joule.kernels.gemv import GemvConfig, gemv, gemv_config  # noqa: E402
from joule.kernels.qkv_rotary import qkv_rotary_gemv  # noqa: E402

LAYERS = 16
HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2048, 8192, 32, 8, 64
REPLAYS = 7
# gemv_config's blocks before 2026-12-06 (i): this sweep's first run put o at 1-row programs and gate/up at 4 x 512
# blocks 1.3 and 1.8 us a layer ahead of these.
PREVIOUS = {"o": GemvConfig(2, 512, 4, 3), "gate_up": GemvConfig(8, 256, 4, 1), "down": GemvConfig(1, 512, 4, 3)}


def main() -> None:
    out_path = sys.argv[1] if len(sys.argv) > 1 else None
    device = torch.device("cuda")
    bandwidth = copy_bandwidth(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    qkv_rows = (HEADS + 2 * KV_HEADS) * HEAD_DIM

    def weight(rows: int, columns: int) -> torch.Tensor:
        return torch.randn(rows, columns, device=device, dtype=torch.bfloat16) * 0.02

    layers = [{"qkv": weight(qkv_rows, HIDDEN), "o": weight(HIDDEN, HIDDEN), "gate_up": weight(2 * INTERMEDIATE, HIDDEN),
               "down": weight(HIDDEN, INTERMEDIATE),
               "norms": [(1 + 0.1 * torch.randn(HIDDEN, device=device)).to(torch.bfloat16) for _ in range(2)]}
              for _ in range(LAYERS)]
    layer_bytes = sum(layers[0][name].numel() * 2 for name in ("qkv", "o", "gate_up", "down"))
    cache = KVCache.allocate(LAYERS, 64, 16, KV_HEADS, HEAD_DIM, torch.bfloat16, device)
    angles = torch.rand(1, HEAD_DIM // 2, device=device) * 40
    cos, sin = angles.cos(), angles.sin()
    slots = torch.tensor([21], device=device)
    hidden0 = torch.randn(1, HIDDEN, device=device, dtype=torch.bfloat16)
    residual0 = torch.randn(1, HIDDEN, device=device, dtype=torch.bfloat16)
    defaults = {"o": gemv_config(HIDDEN, HIDDEN, sms), "gate_up": gemv_config(2 * INTERMEDIATE, HIDDEN, sms, gated=True),
                "down": gemv_config(HIDDEN, INTERMEDIATE, sms)}

    def chain(configs: dict[str, GemvConfig]) -> torch.Tensor:
        hidden, residual = hidden0, residual0
        for index, layer in enumerate(layers):
            query, residual = qkv_rotary_gemv(hidden, layer["qkv"], None, cos, sin, cache.key_caches[index],
                                              cache.value_caches[index], slots, HEADS,
                                              norm_weight=layer["norms"][0], eps=1e-5, residual=residual)
            attended = gemv(query, layer["o"], config=configs["o"])
            activated, residual = gemv(attended, layer["gate_up"], config=configs["gate_up"],
                                       norm_weight=layer["norms"][1], eps=1e-5, residual=residual, gated=True)
            hidden = gemv(activated, layer["down"], config=configs["down"])
        return hidden

    def timed(configs: dict[str, GemvConfig]) -> tuple[float, torch.Tensor]:
        """Microseconds a layer (best of REPLAYS graph replays) and the chain's output."""
        outputs = []  # the warm-up's, then the captured graph's (which the replays refresh)
        seconds = timed_graph(lambda _: outputs.append(chain(configs)), 1, REPLAYS)
        return seconds * 1e6 / LAYERS, outputs[-1].clone()

    print(f"{torch.cuda.get_device_name()}  copy bandwidth {bandwidth / 1e9:.0f} GB/s  SMs {sms}  layer weights "
          f"{layer_bytes / 1e6:.1f} MB = {layer_bytes / bandwidth * 1e6:.1f} us at the copy bandwidth", flush=True)
    print("defaults:", {name: dataclasses.asdict(config) for name, config in defaults.items()}, flush=True)
    rows, baseline_times = [], []
    reference_output = None

    def record(label: str, projection: str, configs: dict[str, GemvConfig]) -> None:
        nonlocal reference_output
        try:
            us, output = timed(configs)
        except Exception as failure:  # noqa: BLE001 - a block shape the compiler rejects
            print(f"  {label}: {failure!r}"[:200], flush=True)
            return
        if reference_output is None:
            reference_output = output
        same = bool(torch.equal(output, reference_output))
        rows.append({"label": label, "projection": projection, "us_per_layer": us, "same_bits": same,
                     "configs": {name: dataclasses.asdict(config) for name, config in configs.items()}})
        if projection == "default":
            baseline_times.append(us)
        print(f"  {us:7.2f} us/layer  {'same' if same else 'DIFFERENT'} bits  {label}", flush=True)

    def with_config(projection: str, config: GemvConfig) -> dict[str, GemvConfig]:
        return {**defaults, projection: config}

    grids = {
        "gate_up": [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product(
            (2, 4, 8, 16), (256, 512, 1024), (4, 8), (1, 2))],
        "down": [GemvConfig(n, k, w, s) for n, k, w, s in itertools.product((1, 2), (512, 1024), (4, 8), (1, 3))],
        "o": [GemvConfig(n, k, w, 3) for n, k, w in itertools.product((1, 2), (256, 512, 1024), (4, 8))],
    }
    record("default", "default", defaults)
    record("previous", "previous", PREVIOUS)
    for projection, grid in grids.items():
        record("default", "default", defaults)
        for config in grid:
            record(f"{projection} {config}", projection, with_config(projection, config))
    record("default", "default", defaults)

    base = min(baseline_times)
    print(f"\ndefault: {', '.join(f'{value:.2f}' for value in baseline_times)} us/layer "
          f"(weights at the copy bandwidth: {layer_bytes / bandwidth * 1e6:.1f} us)")
    for projection in ("previous", *grids):
        best = sorted((row for row in rows if row["projection"] == projection), key=lambda row: row["us_per_layer"])
        gains = ", ".join(f"{row['us_per_layer'] - base:+.2f}" for row in best[:3])
        print(f"{projection}: best {gains} us/layer against the best default")
        for row in best[:3]:
            print(f"    {row['us_per_layer']:7.2f}  {row['label']}")
    if out_path:
        with open(out_path, "w") as handle:
            json.dump({"device": torch.cuda.get_device_name(), "bandwidth": bandwidth, "layer_bytes": layer_bytes,
                       "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
