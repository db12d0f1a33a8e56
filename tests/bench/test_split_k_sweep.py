"""benchmarks/gpu/split_k_sweep.py on the CPU: it loads, names every tile apart, and each tile it times (the
tuner's and its extra ones) computes the product (Triton's interpreter, at the smallest inner dimension it splits)."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.scripts import BENCHMARKS, load_script

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
pytest.importorskip("triton", reason="triton is not installed")

sweep = load_script(BENCHMARKS / "gpu" / "split_k_sweep.py", "split_k_sweep")
TILES = sweep.decode_split_tiles() + sweep.EXTRA_TILES


def test_every_tile_has_its_own_name_and_splits_the_models_inner_dimensions():
    assert len({sweep.name(tile) for tile in TILES}) == len(TILES)
    assert all(tile.fits(in_features) for _, _, _, in_features in sweep.SHAPES for tile in TILES)


@pytest.mark.parametrize("tile", TILES, ids=sweep.name)
def test_each_tile_computes_the_product(tile):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator().manual_seed(tile.splits)
    in_features = tile.splits * tile.block_k
    hidden = torch.randn(20, in_features, generator=generator).to(device, torch.bfloat16)
    weight = (torch.randn(70, in_features, generator=generator) / in_features**0.5).to(device, torch.bfloat16)
    output = sweep.split_k_linear(hidden, weight, tile, sweep.SplitWorkspace(hidden.device))
    torch.testing.assert_close(output.float(), hidden.float() @ weight.float().T, rtol=1e-2, atol=2e-2)
