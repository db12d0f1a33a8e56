"""benchmarks/gpu/decode_layouts.py on the CPU (Triton's interpreter): its paged caches hold the logical KV in every
block size and layout, and its TMA-fed decode kernel gives the engine kernel's output on a head-major cache."""

from __future__ import annotations

import os

import pytest
import torch
from helpers.markers import interpreted_triton_on_cpu
from helpers.scripts import BENCHMARKS, load_script

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the script defines its kernel
pytest.importorskip("triton", reason="triton is not installed")

layouts = load_script(BENCHMARKS / "gpu" / "decode_layouts.py", "decode_layouts")


@pytest.fixture
def on_cpu(monkeypatch):
    monkeypatch.setattr(layouts, "DEVICE", torch.device("cpu"))


@pytest.mark.parametrize("head_major", [False, True])
@pytest.mark.parametrize("block_size", [16, 64])
def test_paged_caches_hold_the_logical_kv(on_cpu, block_size, head_major):
    logical = torch.randn(3, 70, 2, 8, generator=torch.Generator().manual_seed(0))
    cache, tables = layouts.paged_cache(logical, block_size, head_major, torch.Generator().manual_seed(1))
    blocks = cache if not head_major else cache.transpose(1, 2)  # [blocks, block_size, heads, dim]
    for sequence in range(3):
        gathered = torch.cat([blocks[block] for block in tables[sequence].tolist()])
        assert torch.equal(gathered[:70], logical[sequence])
    assert cache.shape[0] == 3 * tables.shape[1] * layouts.SPREAD + 1  # spread over a cache 20x the blocks read


@interpreted_triton_on_cpu
@pytest.mark.parametrize("heads_first", [False, True])
def test_the_tma_kernel_gives_the_engine_kernels_output(on_cpu, heads_first):
    from joule.kernels.paged_decode import paged_decode_attention

    generator = torch.Generator().manual_seed(2)
    keys, values = (torch.randn(3, 150, 2, 64, generator=generator) for _ in range(2))
    query = torch.randn(3, 8, 64, generator=generator)
    lengths = torch.tensor([150, 70, 129], dtype=torch.int32)  # partial last tiles, one length a tile's multiple + 1
    key_cache, tables = layouts.paged_cache(keys, 64, True, torch.Generator().manual_seed(3))
    value_cache, _ = layouts.paged_cache(values, 64, True, torch.Generator().manual_seed(3))
    output = layouts.tma_decode(query, key_cache, value_cache, tables, lengths, 64**-0.5, 64, 4, 2, heads_first)
    expected = paged_decode_attention(query, key_cache.transpose(1, 2), value_cache.transpose(1, 2), tables, lengths,
                                      150, 64**-0.5)
    assert torch.allclose(output, expected, atol=1e-5)
