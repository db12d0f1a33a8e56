"""benchmarks/gpu/decode_gemm_sweep.py on the CPU: its shapes are the models' projections, and the two layouts and
the Triton GEMM it times compute the same product (Triton's interpreter)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers.scripts import BENCHMARKS, load_script

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the script defines its kernel
pytest.importorskip("triton", reason="triton is not installed")

sweep = load_script(BENCHMARKS / "gpu" / "decode_gemm_sweep.py", "decode_gemm_sweep")


def test_shapes_are_the_configs_projections():
    for model in ("llama-3.2-1b", "qwen3-0.6b"):
        config = json.loads((BENCHMARKS / "configs" / model / "config.json").read_text())
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        expected = {
            "qkv": ((config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * head_dim,
                    config["hidden_size"]),
            "o": (config["hidden_size"], config["num_attention_heads"] * head_dim),
            "gate_up": (2 * config["intermediate_size"], config["hidden_size"]),
            "down": (config["hidden_size"], config["intermediate_size"]),
            "lm_head": (config["vocab_size"], config["hidden_size"]),
        }
        found = {projection: (out, inp) for name, projection, out, inp in sweep.SHAPES if name == model}
        assert found == expected


def test_both_layouts_compute_the_same_product():
    calls, results = sweep.products(5, 48, 32, torch.float32, "cpu")
    assert set(calls) == set(sweep.LAYOUTS)  # a handful of rows: no Triton tile
    torch.testing.assert_close(results["out_in"], results["in_out"])
    torch.testing.assert_close(results["out_in"], results["out_in_lt"])  # cuBLASLt's call (plain F.linear on a CPU)
    assert results["out_in"].shape == (5, 48) and results["out_in"].abs().sum() > 0


@pytest.mark.parametrize("tile", [(64, 64, 64, 4, 4), (32, 64, 128, 4, 4)])
def test_the_triton_gemm_matches_at_ragged_shapes(tile):
    """Rows, outputs and the inner dimension all leave partial tiles."""
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(70, 200, generator=generator)
    weight = torch.randn(100, 200, generator=generator)
    torch.testing.assert_close(sweep.triton_gemm(hidden, weight, tile), hidden @ weight.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tile", [(32, 64, 32, 4, 1, 3), (64, 32, 64, 4, 1, 2)])
def test_split_k_sums_the_inner_ranges(tile):
    """Inner-dimension splits summed by atomics, the last range partial, then cast back to the input's dtype."""
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 200, generator=generator)
    weight = torch.randn(72, 200, generator=generator)
    torch.testing.assert_close(sweep.triton_gemm(hidden, weight, tile), hidden @ weight.T, rtol=1e-4, atol=1e-4)


def test_rotating_copies_give_the_same_product_call_after_call():
    calls, results = sweep.products(16, 48, 32, torch.float32, "cpu", copies=3)
    assert any(name.startswith("triton") for name in calls)
    for name, call in calls.items():
        for _ in range(4):  # every copy in turn, then the first again
            torch.testing.assert_close(call(), results["out_in"], rtol=1e-4, atol=1e-4)
