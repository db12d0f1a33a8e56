"""Triton paged-attention kernels and TritonAttentionBackend against plain-torch references.

Random inputs everywhere (the cache starts as noise, never zeros), shuffled block
tables with a spare padded column, GQA ratios 1/2/4, contexts crossing block
edges and chunks starting mid-sequence. Sizes stay small: on CPU these run in
Triton's interpreter (see conftest.py).
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.kv_write import write_kv_cache  # noqa: E402
from joule.kernels.paged_decode import choose_num_splits, paged_decode_attention  # noqa: E402
from joule.kernels.paged_prefill import paged_prefill_attention  # noqa: E402
from joule.kernels.reference import paged_attention_reference, write_kv_cache_reference  # noqa: E402
from joule.runtime.attention.base import AttentionMetadata, KVCache  # noqa: E402
from joule.runtime.attention.portable import PortableAttentionBackend  # noqa: E402
from joule.runtime.attention.select import select_attention_backend  # noqa: E402
from joule.runtime.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCES = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def make_batch(steps, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, seed=0):
    """A paged batch: ``steps`` = [(context_length, query_length)], context already in a noisy cache."""
    generator = torch.Generator().manual_seed(seed)
    shuffler = random.Random(seed)
    num_blocks = sum(-(-(c + q) // block_size) for c, q in steps) + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    value_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    free_blocks = list(range(num_blocks))
    shuffler.shuffle(free_blocks)
    tables = [[free_blocks.pop() for _ in range(-(-(c + q) // block_size))] for c, q in steps]
    block_tables = torch.zeros(len(steps), max(len(t) for t in tables) + 1, dtype=torch.int32)
    for index, table in enumerate(tables):
        block_tables[index, : len(table)] = torch.tensor(table, dtype=torch.int32)
    slots = [table[p // block_size] * block_size + p % block_size
             for table, (c, q) in zip(tables, steps) for p in range(c, c + q)]
    query_lengths = [q for _, q in steps]
    num_tokens = sum(query_lengths)

    def rows(heads):
        return (torch.randn(num_tokens, heads, head_dim, generator=generator) + 0.25).to(DEVICE, dtype)

    metadata = AttentionMetadata(
        query_start_locations=torch.tensor([0] + torch.tensor(query_lengths).cumsum(0).tolist(), device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        query_lengths=query_lengths,
        context_lengths=[c for c, _ in steps],
        sequence_lengths=[c + q for c, q in steps],
    )
    return dict(query=rows(num_heads), key=rows(num_kv_heads), value=rows(num_kv_heads),
                cache=KVCache([key_cache], [value_cache], block_size), metadata=metadata)


def reference_output(batch, scale):
    """Write the new rows with the reference scatter, then dense float64 attention."""
    cache, metadata = batch["cache"], batch["metadata"]
    write_kv_cache_reference(batch["key"], batch["value"], cache.key_caches[0], cache.value_caches[0],
                             metadata.slot_mapping)
    return paged_attention_reference(batch["query"], cache.key_caches[0], cache.value_caches[0],
                                     metadata.block_tables, metadata.query_lengths, metadata.sequence_lengths, scale)


def device_lengths(metadata):
    return torch.tensor(metadata.sequence_lengths, dtype=torch.int32, device=DEVICE)


def assert_close(actual, expected, dtype):
    tolerance = TOLERANCES[dtype]
    assert torch.isfinite(actual).all()
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("block_size", [1, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_matches_reference_and_skips_negative_slots(block_size, dtype):
    batch = make_batch([(3, 5), (17, 1), (0, 40)], 4, 2, 32, block_size, dtype, seed=block_size)
    cache, slots = batch["cache"], batch["metadata"].slot_mapping.clone()
    slots[1] = -1  # a padding row must leave the cache alone
    # strided views, as split out of a merged projection
    merged = torch.cat([batch["key"], batch["value"], batch["key"]], dim=1)
    key, value = merged[:, :2], merged[:, 2:4]
    expected_keys, expected_values = cache.key_caches[0].clone(), cache.value_caches[0].clone()
    write_kv_cache_reference(key, value, expected_keys, expected_values, slots)
    write_kv_cache(key, value, cache.key_caches[0], cache.value_caches[0], slots)
    assert torch.equal(cache.key_caches[0], expected_keys)
    assert torch.equal(cache.value_caches[0], expected_values)


DECODE_STEPS = [(0, 1), (15, 1), (16, 1), (33, 1), (130, 1), (200, 1)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2)])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (32, 32), (4, 16), (8, 48)])  # 48: padded dims
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_matches_reference(num_heads, num_kv_heads, block_size, head_dim, num_splits):
    batch = make_batch(DECODE_STEPS, num_heads, num_kv_heads, head_dim, block_size, seed=num_heads + block_size)
    scale = head_dim**-0.5
    expected = reference_output(batch, scale)
    cache, metadata = batch["cache"], batch["metadata"]
    output = paged_decode_attention(
        batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
        device_lengths(metadata), metadata.max_sequence_length, scale, num_splits=num_splits,
    )
    assert_close(output, expected, torch.float32)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_grid_order_heads_first_gives_the_same_output(num_splits):
    """``launch={"heads_first": True}`` only reorders the programs (a sequence's KV heads launched side by side);
    the output, split partials and merge included, must not change."""
    batch = make_batch(DECODE_STEPS, 8, 2, 32, 16, seed=5)
    expected = reference_output(batch, 0.2)  # writes the new rows into the cache first
    cache, metadata = batch["cache"], batch["metadata"]
    outputs = [paged_decode_attention(
        batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables, device_lengths(metadata),
        metadata.max_sequence_length, 0.2, num_splits=num_splits, launch={"heads_first": heads_first})
        for heads_first in (False, True)]
    assert torch.equal(outputs[0], outputs[1])
    assert_close(outputs[1], expected, torch.float32)


@pytest.mark.parametrize("min_split_tokens", [None, 256])
def test_decode_splits_each_sequence_by_its_own_length_under_a_large_length_bound(min_split_tokens):
    """As inside a CUDA graph: the host bound is max_model_len, far above every context, and each
    sequence splits its own context (600 tokens -> 3 or 5 splits, 5 tokens -> 1)."""
    batch = make_batch([(4, 1), (129, 1), (599, 1)], 8, 2, 32, 16, seed=11)
    expected = reference_output(batch, 0.2)
    cache, metadata = batch["cache"], batch["metadata"]
    output = paged_decode_attention(
        batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
        device_lengths(metadata), 65536, 0.2, num_splits=8, min_split_tokens=min_split_tokens,
    )
    assert_close(output, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_half_precision(dtype):
    batch = make_batch(DECODE_STEPS, 8, 2, 64, 16, dtype, seed=7)
    expected = reference_output(batch, 0.125)
    cache, metadata = batch["cache"], batch["metadata"]
    output = paged_decode_attention(
        batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
        device_lengths(metadata), metadata.max_sequence_length, 0.125, num_splits=2,
    )
    assert output.dtype == dtype
    assert_close(output, expected, dtype)


PREFILL_STEPS = [(0, 7), (5, 1), (3, 20), (16, 16), (0, 1), (37, 13), (70, 45)]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (4, 2), (8, 2), (6, 2)])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (32, 32), (2, 16), (64, 48)])
def test_prefill_chunks_match_reference(num_heads, num_kv_heads, block_size, head_dim):
    batch = make_batch(PREFILL_STEPS, num_heads, num_kv_heads, head_dim, block_size, seed=block_size + num_heads)
    scale = head_dim**-0.5
    expected = reference_output(batch, scale)
    cache, metadata = batch["cache"], batch["metadata"]
    output = paged_prefill_attention(
        batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
        metadata.query_start_locations, device_lengths(metadata), scale,
        query_lengths=metadata.query_lengths, host_sequence_lengths=metadata.sequence_lengths,
    )
    assert_close(output, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half_precision_long_prompt(dtype):
    batch = make_batch([(0, 150), (64, 70)], 8, 2, 64, 16, dtype, seed=3)
    expected = reference_output(batch, 0.125)
    cache, metadata = batch["cache"], batch["metadata"]
    output = paged_prefill_attention(
        batch["query"], cache.key_caches[0], cache.value_caches[0], metadata.block_tables,
        metadata.query_start_locations, device_lengths(metadata), 0.125,
        query_lengths=metadata.query_lengths, host_sequence_lengths=metadata.sequence_lengths,
    )
    assert_close(output, expected, dtype)


def test_prefill_tiles_built_ahead_for_a_block_m_override():
    """A sweep builds its tiles outside a CUDA graph: tiles for a block_m override are taken when ``tile_rows`` says
    they were built for it, and refused when it does not (tiles of another size would skip or repeat rows)."""
    from joule.kernels.paged_prefill import build_tiles

    batch = make_batch([(0, 40), (9, 23)], 8, 2, 32, 16, seed=4)
    expected = reference_output(batch, 0.2)
    cache, metadata = batch["cache"], batch["metadata"]
    launch = dict(block_m=32, block_n=16, num_warps=4, num_stages=2)
    tiles = build_tiles(metadata.query_lengths, metadata.sequence_lengths, 32 // 4, batch["query"].device)

    def run(**settings):
        return paged_prefill_attention(batch["query"], cache.key_caches[0], cache.value_caches[0],
                                       metadata.block_tables, metadata.query_start_locations, device_lengths(metadata),
                                       0.2, tiles=tiles, launch={**launch, **settings})

    assert_close(run(tile_rows=8), expected, torch.float32)
    with pytest.raises(ValueError, match="block_m override"):
        run()
    with pytest.raises(ValueError, match="block_m override"):
        run(tile_rows=16)


BACKEND_CASES = [
    ("decode only", [(0, 1), (31, 1), (32, 1), (100, 1)]),
    ("mixed decodes and chunks", [(9, 1), (0, 12), (20, 1), (16, 17), (48, 5), (3, 1), (0, 1), (150, 1)]),
    ("prefix hit tail", [(64, 3), (32, 40)]),
]


@pytest.mark.parametrize("case", [name for name, _ in BACKEND_CASES])
def test_triton_backend_on_a_head_major_cache_matches_the_token_major_one(case):
    """``KVCache.allocate(head_major=True)``: the same logical cache stored head by head within each block; the
    stride-aware kernels (cache write, prompt chunks, decode with splits) give the same outputs and contents."""
    steps = dict(BACKEND_CASES)[case]
    results = []
    for head_major in (False, True):
        batch = make_batch(steps, 8, 2, 32, 16, torch.float32, seed=11)
        token_major = batch["cache"]
        cache = KVCache.allocate(1, token_major.num_blocks, 16, 2, 32, torch.float32, DEVICE, head_major=head_major)
        cache.key_caches[0].copy_(token_major.key_caches[0])
        cache.value_caches[0].copy_(token_major.value_caches[0])
        assert cache.key_caches[0].is_contiguous() is not head_major
        output = TritonAttentionBackend(decode_num_splits=2).forward(
            0, batch["query"], batch["key"], batch["value"], cache, batch["metadata"], 32**-0.5)
        results.append((output, cache.key_caches[0].contiguous(), cache.value_caches[0].contiguous()))
    (output, keys, values), (head_major_output, head_major_keys, head_major_values) = results
    assert torch.equal(keys, head_major_keys) and torch.equal(values, head_major_values)
    assert torch.equal(output, head_major_output)


@pytest.mark.parametrize("case", [name for name, _ in BACKEND_CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_portable(case, dtype):
    steps = dict(BACKEND_CASES)[case]
    results = []
    for backend in (PortableAttentionBackend(), TritonAttentionBackend(decode_num_splits=2)):
        batch = make_batch(steps, 8, 2, 32, 16, dtype, seed=11)
        cache = batch["cache"]
        outputs = [backend.forward(0, batch["query"], batch["key"], batch["value"], cache, batch["metadata"],
                                   32**-0.5) for _ in range(2)]  # second call reuses the per-step tensors
        torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
        results.append((outputs[0], cache.key_caches[0], cache.value_caches[0]))
    (expected, expected_keys, expected_values), (output, keys, values) = results
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)
    assert output.dtype == dtype and output.shape == expected.shape
    assert_close(output, expected, dtype)


@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_padding_row_of_length_zero_gets_zeros(num_splits):
    """A padded batch (CUDA graphs) carries rows of length 0: they must come out finite (zeros)."""
    batch = make_batch([(40, 1), (130, 1)], 4, 2, 16, 16, seed=5)
    expected = reference_output(batch, 0.25)
    cache, metadata = batch["cache"], batch["metadata"]
    query = torch.cat([batch["query"], batch["query"][:1]])
    tables = torch.cat([metadata.block_tables, torch.zeros_like(metadata.block_tables[:1])])
    lengths = torch.tensor(metadata.sequence_lengths + [0], dtype=torch.int32, device=DEVICE)
    output = paged_decode_attention(query, cache.key_caches[0], cache.value_caches[0], tables, lengths,
                                    metadata.max_sequence_length, 0.25, num_splits=num_splits)
    assert_close(output[:2], expected, torch.float32)
    assert torch.equal(output[2], torch.zeros_like(output[2]))


def test_split_choice_fills_the_gpu_only_when_needed():
    assert choose_num_splits(256, 8, 4096, 132) == 1  # big batch: already 2048 programs
    assert choose_num_splits(1, 8, 4096, 132) == 32  # one sequence: split the context, >= 128 tokens each
    assert choose_num_splits(1, 8, 100, 132) == 1  # short context: nothing worth splitting


def test_select_backend():
    assert select_attention_backend("cpu").name == "portable"
    if torch.cuda.is_available():
        assert select_attention_backend("cuda").name == "triton"


def test_errors_are_clear():
    batch = make_batch([(0, 1)], 6, 4, 16, 16)
    cache, metadata = batch["cache"], batch["metadata"]
    with pytest.raises(ValueError, match="multiple of KV heads"):
        paged_decode_attention(batch["query"][:, :6], cache.key_caches[0], cache.value_caches[0],
                               metadata.block_tables, device_lengths(metadata), 1, 0.25)
