"""PortableAttentionBackend against dense per-sequence causal attention (no paging)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from joule.runtime.attention.base import AttentionMetadata, KVCache
from joule.runtime.attention.portable import PortableAttentionBackend


def reference_attention(query, keys, values, context_length, scale):
    """Dense attention for rows at positions context_length.. over keys 0..position (HF head grouping)."""
    query_length, num_heads, _ = query.shape
    group = num_heads // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1).double()
    values = values.repeat_interleave(group, dim=1).double()
    scores = torch.einsum("qhd,khd->hqk", query.double(), keys) * scale
    positions = torch.arange(context_length, context_length + query_length)
    allowed = torch.arange(keys.shape[0])[None, :] <= positions[:, None]
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def run_step(sequences, steps, num_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32, device="cpu"):
    """Write each sequence's context into a shuffled paged cache, then attend its new rows in one step.

    ``steps`` is a list of (context_length, query_length), one per sequence; ``sequences``
    holds each sequence's full (query, key, value) histories.
    """
    generator = random.Random(len(steps) * 1000 + block_size)
    num_blocks = sum(-(-(c + q) // block_size) for c, q in steps) + 3  # a few never-used blocks
    cache = KVCache.allocate(1, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    free_blocks = list(range(num_blocks))
    generator.shuffle(free_blocks)
    tables = []
    for (context_length, query_length) in steps:
        needed = -(-(context_length + query_length) // block_size)
        tables.append([free_blocks.pop() for _ in range(needed)])

    def slot(table, position):
        return table[position // block_size] * block_size + position % block_size

    flat_keys = cache.key_caches[0].view(-1, num_kv_heads, head_dim)
    flat_values = cache.value_caches[0].view(-1, num_kv_heads, head_dim)
    queries, keys, values, slots = [], [], [], []
    for (query, key, value), table, (context_length, query_length) in zip(sequences, tables, steps):
        for position in range(context_length):
            flat_keys[slot(table, position)] = key[position].to(device, dtype)
            flat_values[slot(table, position)] = value[position].to(device, dtype)
        rows = slice(context_length, context_length + query_length)
        queries.append(query[rows])
        keys.append(key[rows])
        values.append(value[rows])
        slots += [slot(table, position) for position in range(context_length, context_length + query_length)]

    width = max(len(table) for table in tables) + 1  # one spare column: padding must be ignored
    block_tables = torch.zeros(len(tables), width, dtype=torch.int32)
    for index, table in enumerate(tables):
        block_tables[index, : len(table)] = torch.tensor(table, dtype=torch.int32)
    query_lengths = [query_length for _, query_length in steps]
    context_lengths = [context_length for context_length, _ in steps]
    metadata = AttentionMetadata(
        query_start_locations=torch.tensor([0] + list(torch.tensor(query_lengths).cumsum(0).tolist()), device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        block_tables=block_tables.to(device),
        query_lengths=query_lengths,
        context_lengths=context_lengths,
        sequence_lengths=[c + q for c, q in zip(context_lengths, query_lengths)],
    )
    scale = head_dim**-0.5
    output = PortableAttentionBackend().forward(
        0, torch.cat(queries).to(device, dtype), torch.cat(keys).to(device, dtype),
        torch.cat(values).to(device, dtype), cache, metadata, scale,
    ).cpu()
    expected = torch.cat([
        reference_attention(query[c : c + q], key[: c + q], value[: c + q], c, scale)
        for (query, key, value), (c, q) in zip(sequences, steps)
    ])
    return output, expected, cache, slots, torch.cat(keys).to(device)


def random_sequences(steps, num_heads, num_kv_heads, head_dim, seed):
    generator = torch.Generator().manual_seed(seed)
    sequences = []
    for context_length, query_length in steps:
        length = context_length + query_length
        sequences.append((
            torch.randn(length, num_heads, head_dim, generator=generator),
            torch.randn(length, num_kv_heads, head_dim, generator=generator),
            torch.randn(length, num_kv_heads, head_dim, generator=generator) + 0.5,
        ))
    return sequences


HEAD_LAYOUTS = [(4, 4), (4, 2), (8, 2), (6, 1)]  # (query heads, kv heads): GQA ratios 1, 2, 4, 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_decode_batch_matches_reference(num_heads, num_kv_heads, block_size, device):
    steps = [(0, 1), (3, 1), (4, 1), (15, 1), (16, 1), (37, 1)]
    sequences = random_sequences(steps, num_heads, num_kv_heads, 8, seed=block_size)
    output, expected, *_ = run_step(sequences, steps, num_heads, num_kv_heads, 8, block_size, device=device)
    torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_heads,num_kv_heads", HEAD_LAYOUTS)
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_mixed_prefill_and_decode_matches_reference(num_heads, num_kv_heads, block_size, device):
    # Fresh prompts, chunks continuing mid-block and at block edges, and decode rows together.
    steps = [(0, 7), (5, 1), (3, 6), (8, 8), (0, 1), (17, 13), (30, 1)]
    sequences = random_sequences(steps, num_heads, num_kv_heads, 16, seed=100 + block_size)
    output, expected, *_ = run_step(sequences, steps, num_heads, num_kv_heads, 16, block_size, device=device)
    torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)


def test_new_keys_and_values_are_written_at_their_slots():
    steps = [(2, 3), (6, 1)]
    sequences = random_sequences(steps, 4, 2, 8, seed=7)
    _, _, cache, slots, new_keys = run_step(sequences, steps, 4, 2, 8, block_size=4)
    written = cache.key_caches[0].view(-1, 2, 8)[torch.tensor(slots)]
    torch.testing.assert_close(written, new_keys)


@pytest.mark.parametrize("device", DEVICES)
def test_low_precision_cache_stays_close_to_reference(device):
    steps = [(0, 9), (12, 5), (20, 1)]
    sequences = random_sequences(steps, 8, 2, 32, seed=3)
    output, expected, *_ = run_step(sequences, steps, 8, 2, 32, 4, dtype=torch.bfloat16, device=device)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.double(), expected, atol=3e-2, rtol=3e-2)


def test_decode_only_batch_uses_one_attention_call(monkeypatch):
    import joule.runtime.attention.portable as portable

    calls = []
    original = portable.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(portable.F, "scaled_dot_product_attention", counting)
    steps = [(length, 1) for length in range(0, 64, 3)]
    sequences = random_sequences(steps, 4, 2, 8, seed=11)
    output, expected, *_ = run_step(sequences, steps, 4, 2, 8, 4)
    assert len(calls) == 1
    torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)


def test_mismatched_shapes_raise_clear_error():
    cache = KVCache.allocate(1, 4, 4, 2, 8, torch.float32, "cpu")
    metadata = AttentionMetadata(
        query_start_locations=torch.tensor([0, 3]), slot_mapping=torch.arange(3),
        block_tables=torch.zeros(1, 1, dtype=torch.int32), query_lengths=[3], context_lengths=[0],
        sequence_lengths=[3],
    )
    with pytest.raises(ValueError, match="do not match"):
        PortableAttentionBackend().forward(
            0, torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8), cache, metadata, 1.0
        )


def test_one_backend_over_layers_and_steps_with_strided_inputs():
    """The per-step decode plan is shared by the layers of a step and rebuilt for the next step;
    query/key/value may be column slices of one merged projection (as the model passes them)."""
    num_heads, num_kv_heads, head_dim, block_size, num_layers = 4, 2, 8, 4, 2
    prompt_lengths = [3, 9, 4]
    generator = torch.Generator().manual_seed(5)
    cache = KVCache.allocate(num_layers, 16, block_size, num_kv_heads, head_dim, torch.float32, "cpu")
    block_ids = torch.randperm(16, generator=generator).tolist()
    tables = [block_ids[0:4], block_ids[4:8], block_ids[8:12]]
    history = {(layer, seq): ([], []) for layer in range(num_layers) for seq in range(3)}
    backend = PortableAttentionBackend()
    width = (num_heads + 2 * num_kv_heads) * head_dim
    lengths = list(prompt_lengths)
    for step in range(4):
        is_prefill = step == 0
        query_lengths = lengths if is_prefill else [1, 1, 1]
        context_lengths = [0, 0, 0] if is_prefill else [length - 1 for length in lengths]
        slots = [
            tables[seq][position // block_size] * block_size + position % block_size
            for seq in range(3) for position in range(context_lengths[seq], context_lengths[seq] + query_lengths[seq])
        ]
        metadata = AttentionMetadata(
            query_start_locations=torch.tensor([0] + torch.tensor(query_lengths).cumsum(0).tolist()),
            slot_mapping=torch.tensor(slots), block_tables=torch.tensor(tables, dtype=torch.int32),
            query_lengths=list(query_lengths), context_lengths=context_lengths,
            sequence_lengths=[c + q for c, q in zip(context_lengths, query_lengths)],
        )
        for layer in range(num_layers):
            merged = torch.randn(sum(query_lengths), width, generator=generator)
            query = merged[:, : num_heads * head_dim].view(-1, num_heads, head_dim)
            key = merged[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(-1, num_kv_heads, head_dim)
            value = merged[:, (num_heads + num_kv_heads) * head_dim :].view(-1, num_kv_heads, head_dim)
            output = backend.forward(layer, query, key, value, cache, metadata, head_dim**-0.5)
            start = 0
            for seq in range(3):
                rows = slice(start, start + query_lengths[seq])
                keys, values = history[(layer, seq)]
                keys.append(key[rows])
                values.append(value[rows])
                expected = reference_attention(
                    query[rows], torch.cat(keys), torch.cat(values), context_lengths[seq], head_dim**-0.5
                )
                torch.testing.assert_close(output[rows].double(), expected, atol=1e-5, rtol=1e-5)
                start += query_lengths[seq]
        lengths = [length + 1 for length in lengths]


@pytest.mark.parametrize("num_heads,num_kv_heads", [(4, 4), (6, 2)])
def test_mixed_step_batches_decodes_and_runs_of_equal_fresh_prompts(monkeypatch, num_heads, num_kv_heads):
    import joule.runtime.attention.portable as portable

    calls = []
    original = portable.F.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return original(*args, **kwargs)

    monkeypatch.setattr(portable.F, "scaled_dot_product_attention", counting)
    # Decodes among prompts; three adjacent fresh prompts of length 5 form one run, the later one another.
    steps = [(4, 1), (0, 5), (0, 5), (0, 5), (0, 3), (7, 1), (2, 4), (0, 5), (0, 1)]
    sequences = random_sequences(steps, num_heads, num_kv_heads, 8, seed=21)
    output, expected, *_ = run_step(sequences, steps, num_heads, num_kv_heads, 8, 4)
    torch.testing.assert_close(output.double(), expected, atol=1e-5, rtol=1e-5)
    group = num_heads // num_kv_heads
    assert sorted(calls) == sorted([
        (3, num_kv_heads, group, 8),  # the three one-row sequences, one padded call
        (3, num_heads, 5, 8),  # the run of three fresh 5-token prompts
        (1, num_heads, 3, 8),
        (1, num_heads, 4, 8),  # the chunk after 2 cached tokens
        (1, num_heads, 5, 8),
    ])


def test_decode_steps_keep_dense_contexts_and_rebuild_when_the_batch_changes(monkeypatch):
    """Consecutive decode steps append to kept dense copies instead of gathering again; a dropped
    sequence or a prompt step starts afresh; every step matches dense reference attention."""
    import joule.runtime.attention.decode_contexts as decode_contexts

    rebuilds = []
    original = decode_contexts._dense_from_cache
    monkeypatch.setattr(decode_contexts, "_dense_from_cache", lambda *args: rebuilds.append(1) or original(*args))
    num_heads, num_kv_heads, head_dim, block_size, num_layers = 6, 2, 8, 4, 2
    generator = torch.Generator().manual_seed(9)
    cache = KVCache.allocate(num_layers, 256, block_size, num_kv_heads, head_dim, torch.float32, "cpu")
    free = torch.randperm(256, generator=generator).tolist()
    tables = {seq: [] for seq in range(3)}
    history = {(layer, seq): ([], []) for layer in range(num_layers) for seq in range(3)}
    lengths = {0: 0, 1: 0, 2: 0}
    backend = PortableAttentionBackend()
    # (sequences in the step, new rows each): a prompt step, decodes crossing block edges,
    # one sequence leaving (rebuild), a prompt chunk, decodes again.
    schedule = [([0, 1, 2], [5, 3, 7])] + [([0, 1, 2], [1, 1, 1])] * 4 + [([0, 2], [1, 1])] * 2
    schedule += [([1], [4])] + [([0, 1, 2], [1, 1, 1])] * 2
    copies_built = []
    for step_index, (sequences, new_rows) in enumerate(schedule):
        slots = []
        for seq, count in zip(sequences, new_rows):
            for position in range(lengths[seq], lengths[seq] + count):
                if position % block_size == 0:
                    tables[seq].append(free.pop())
                slots.append(tables[seq][position // block_size] * block_size + position % block_size)
        width = max(len(tables[seq]) for seq in sequences)
        metadata = AttentionMetadata(
            query_start_locations=torch.tensor([0] + torch.tensor(new_rows).cumsum(0).tolist()),
            slot_mapping=torch.tensor(slots),
            block_tables=torch.tensor([tables[seq] + [0] * (width - len(tables[seq])) for seq in sequences],
                                      dtype=torch.int32),
            query_lengths=list(new_rows), context_lengths=[lengths[seq] for seq in sequences],
            sequence_lengths=[lengths[seq] + count for seq, count in zip(sequences, new_rows)],
        )
        rebuilds.clear()
        for layer in range(num_layers):
            total = sum(new_rows)
            query = torch.randn(total, num_heads, head_dim, generator=generator)
            key = torch.randn(total, num_kv_heads, head_dim, generator=generator)
            value = torch.randn(total, num_kv_heads, head_dim, generator=generator)
            output = backend.forward(layer, query, key, value, cache, metadata, 0.3)
            start = 0
            for seq, count in zip(sequences, new_rows):
                rows = slice(start, start + count)
                keys, values = history[(layer, seq)]
                keys.append(key[rows])
                values.append(value[rows])
                expected = reference_attention(query[rows], torch.cat(keys), torch.cat(values), lengths[seq], 0.3)
                torch.testing.assert_close(output[rows].double(), expected, atol=1e-5, rtol=1e-5)
                start += count
        copies_built.append(len(rebuilds) // (2 * num_layers))
        for seq, count in zip(sequences, new_rows):
            lengths[seq] += count
    # Prompt steps never copy; the first decode step of a batch builds the copies, later ones append.
    assert copies_built == [0, 1, 0, 0, 0, 1, 0, 0, 1, 0]
