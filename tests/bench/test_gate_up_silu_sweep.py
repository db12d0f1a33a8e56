"""benchmarks/gpu/gate_up_silu_sweep.py on the CPU (Triton's interpreter): the fused gate/up + SiLU GEMM computes
what the engine's merged projection followed by silu_and_mul computes, over partial tiles and grouped programs."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.scripts import BENCHMARKS, load_script

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the script defines its kernel
pytest.importorskip("triton", reason="triton is not installed")

sweep = load_script(BENCHMARKS / "gpu" / "gate_up_silu_sweep.py", "gate_up_silu_sweep")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows,intermediate,hidden_size,tile", [
    (40, 48, 64, (16, 16, 16, 4, 1, 2)),   # 3 row blocks in groups of 2: the last group is short
    (16, 40, 72, (16, 32, 32, 4, 1, 8)),   # neither the columns nor the inner size a multiple of the tile
])
def test_fused_gemm_matches_projection_then_silu_and_mul(rows, intermediate, hidden_size, tile):
    hidden, weight = sweep.inputs(rows, intermediate, hidden_size, torch.float32, DEVICE)
    fused = sweep.gate_up_silu(hidden, weight, tile)
    gate, up = torch.nn.functional.linear(hidden, weight).split(intermediate, dim=1)
    expected = torch.nn.functional.silu(gate) * up
    assert fused.shape == (rows, intermediate) and fused.abs().sum() > 0
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(sweep.unfused(hidden, weight), expected, atol=1e-4, rtol=1e-4)


def test_shapes_are_the_configs_mlps():
    import json

    for model, intermediate, hidden_size in sweep.SHAPES:
        config = json.loads((BENCHMARKS / "configs" / model / "config.json").read_text())
        assert (config["intermediate_size"], config["hidden_size"]) == (intermediate, hidden_size)


def test_rejects_a_weight_that_is_not_merged_gate_over_up():
    with pytest.raises(ValueError, match="must be"):
        sweep.gate_up_silu(torch.ones(2, 8), torch.ones(5, 8), sweep.TILES[0])
