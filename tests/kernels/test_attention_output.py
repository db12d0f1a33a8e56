"""The batch-1 attention + output projection kernels (fused whole-context attention; the split merge done by the
o projection) against the reference attention and F.linear.

Random caches (never zeros), shuffled block tables, GQA ratios 1 to 4, contexts crossing block and tile
edges, head-major cache layouts, row blocks that leave a ragged last block and split counts above what a short
context uses (only the splits that ran are merged). On CPU: Triton's interpreter.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.attention_output import (  # noqa: E402
    decode_attention_output,
    fits_fused_attention_output,
    fits_merge_output_projection,
    merge_output_projection,
)
from joule.kernels.paged_decode import decode_attention_partials, paged_decode_attention  # noqa: E402
from joule.kernels.reference import paged_attention_reference  # noqa: E402
from joule.runtime.attention.base import KVCache  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_case(length, num_heads, num_kv_heads, head_dim, out_features, block_size=16, dtype=torch.float32,
              head_major=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    num_blocks = -(-length // block_size) + 3
    cache = KVCache.allocate(1, num_blocks, block_size, num_kv_heads, head_dim, dtype, DEVICE, head_major=head_major)
    cache.key_caches[0].copy_(torch.randn(cache.key_caches[0].shape, generator=generator))
    cache.value_caches[0].copy_(torch.randn(cache.value_caches[0].shape, generator=generator))
    blocks = list(range(num_blocks))
    random.Random(seed).shuffle(blocks)
    table = torch.tensor(blocks[: -(-length // block_size)] + [0], dtype=torch.int32, device=DEVICE)
    query = (torch.randn(1, num_heads, head_dim, generator=generator) + 0.25).to(DEVICE, dtype)
    weight = (torch.randn(out_features, num_heads * head_dim, generator=generator) / head_dim).to(DEVICE, dtype)
    return query, cache, table, weight


def reference(query, cache, table, weight, length, scale):
    attended = paged_attention_reference(query, cache.key_caches[0], cache.value_caches[0], table[None], [1],
                                         [length], scale)
    return (attended.reshape(1, -1) @ weight.double().T)


@pytest.mark.parametrize("length,num_heads,num_kv_heads,head_dim,out_features,head_major", [
    (1, 4, 4, 16, 48, False),      # one token, no GQA
    (37, 8, 2, 32, 100, False),    # GQA 4, ragged row block
    (130, 6, 3, 16, 64, True),     # GQA 2 (a padded group), two tiles, head-major blocks
    (300, 4, 1, 64, 40, False),    # one KV head: every row block's partials are a single group
    (1024, 4, 2, 16, 32, False),   # the longest context the backend fuses (FUSED_MAX_CONTEXT)
])
def test_fused_matches_reference(length, num_heads, num_kv_heads, head_dim, out_features, head_major):
    query, cache, table, weight = make_case(length, num_heads, num_kv_heads, head_dim, out_features,
                                            head_major=head_major, seed=length)
    scale = head_dim ** -0.5
    lengths = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    launch = {"block_rows": 32, "block_n": 32}  # several row blocks and context tiles at these small sizes
    output = decode_attention_output(query, cache.key_caches[0], cache.value_caches[0], table, lengths, weight,
                                     scale, launch=launch)
    expected = reference(query, cache, table, weight, length, scale)
    assert output.shape == (1, out_features)
    torch.testing.assert_close(output.double(), expected, rtol=1e-4, atol=1e-4)


def test_reused_buffers_give_identical_results_and_reset_counters():
    """Counters return to zero after each launch, so persistent buffers serve every layer and step alike."""
    query, cache, table, weight = make_case(70, 8, 2, 16, 64, seed=3)
    lengths = torch.tensor([70], dtype=torch.int32, device=DEVICE)
    scratch = {}
    runs = [decode_attention_output(query, cache.key_caches[0], cache.value_caches[0], table, lengths, weight,
                                    0.25, scratch=scratch, launch={"block_rows": 16, "block_n": 32})
            for _ in range(3)]
    (buffers,) = scratch.values()  # one set, reused by all three launches
    assert torch.equal(buffers.counters, torch.zeros_like(buffers.counters))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])
    expected = reference(query, cache, table, weight, 70, 0.25)
    torch.testing.assert_close(runs[0].double(), expected, rtol=1e-4, atol=1e-4)


def test_bfloat16_within_tolerance():
    query, cache, table, weight = make_case(90, 8, 2, 32, 64, dtype=torch.bfloat16, seed=5)
    lengths = torch.tensor([90], dtype=torch.int32, device=DEVICE)
    output = decode_attention_output(query, cache.key_caches[0], cache.value_caches[0], table, lengths, weight,
                                     32 ** -0.5, launch={"block_rows": 32, "block_n": 32})
    expected = reference(query.float(), cache, table, weight.float(), 90, 32 ** -0.5)
    assert output.dtype == torch.bfloat16
    torch.testing.assert_close(output.double(), expected, rtol=3e-2, atol=3e-2)


def test_unserved_shapes_are_refused():
    weight = torch.zeros(64, 8 * 128)
    assert not fits_fused_attention_output(8, 2, 128, weight, torch.float32, torch.float32)  # 512-wide group
    assert not fits_fused_attention_output(8, 2, 64, weight.to(torch.bfloat16)[:, :512], torch.float8_e4m3fn,
                                           torch.bfloat16)  # fp8 cache
    assert fits_fused_attention_output(8, 2, 64, weight[:, :512].contiguous(), torch.float32, torch.float32)
    query = torch.zeros(1, 8, 128)
    cache = torch.zeros(2, 16, 2, 128)
    with pytest.raises(ValueError, match="not served"):
        decode_attention_output(query, cache, cache, torch.zeros(2, dtype=torch.int32),
                                torch.ones(1, dtype=torch.int32), weight, 1.0)


def merged(query, cache, table, weight, length, scale, num_splits, max_length, scratch=None, launch=None):
    lengths = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    partials = decode_attention_partials(query, cache.key_caches[0], cache.value_caches[0], table[None], lengths,
                                         max_length, scale, num_splits=num_splits, launch={"block_n": 32})
    assert partials is not None and partials.num_splits > 1
    return merge_output_projection(partials, lengths, weight, cache.key_caches[0].shape[2], query.shape[-1],
                                   scratch=scratch, launch=launch or {"block_rows": 32})


@pytest.mark.parametrize("length,num_heads,num_kv_heads,head_dim,out_features,num_splits,max_length", [
    (37, 8, 2, 32, 100, 2, 64),     # GQA 4, two splits, a ragged row block
    (130, 6, 3, 16, 64, 8, 256),    # GQA 2 (a padded group): 5 of 8 splits used
    (300, 4, 1, 64, 40, 4, 1024),   # one KV head: 3 of 4 splits used
    (1, 4, 4, 16, 48, 8, 1024),     # one token: one split used of eight
    (1000, 8, 2, 16, 32, 32, 4096), # 32 splits, as a long-context batch-1 graph
])
def test_merged_projection_matches_reference(length, num_heads, num_kv_heads, head_dim, out_features, num_splits,
                                             max_length):
    query, cache, table, weight = make_case(length, num_heads, num_kv_heads, head_dim, out_features, seed=length)
    scale = head_dim ** -0.5
    output = merged(query, cache, table, weight, length, scale, num_splits, max_length)
    assert output.shape == (1, out_features)
    torch.testing.assert_close(output.double(), reference(query, cache, table, weight, length, scale),
                               rtol=1e-4, atol=1e-4)
    # And as the unfused path computes it: the merge kernel's output through a matrix product.
    lengths = torch.tensor([length], dtype=torch.int32, device=DEVICE)
    unfused = paged_decode_attention(query, cache.key_caches[0], cache.value_caches[0], table[None], lengths,
                                     max_length, scale, num_splits=num_splits, launch={"block_n": 32})
    torch.testing.assert_close(output, unfused.reshape(1, -1) @ weight.T, rtol=1e-5, atol=1e-5)


def test_merged_projection_reuses_buffers_alike():
    query, cache, table, weight = make_case(90, 8, 2, 16, 64, seed=7)
    scratch = {}
    runs = [merged(query, cache, table, weight, 90, 0.25, 4, 256, scratch=scratch, launch={"block_rows": 16})
            for _ in range(3)]
    (buffers,) = scratch.values()
    assert torch.equal(buffers.counters, torch.zeros_like(buffers.counters))
    assert torch.equal(runs[0], runs[1]) and torch.equal(runs[1], runs[2])


def test_merged_projection_in_bfloat16_within_tolerance():
    query, cache, table, weight = make_case(200, 8, 2, 32, 64, dtype=torch.bfloat16, seed=11)
    output = merged(query, cache, table, weight, 200, 32 ** -0.5, 8, 1024)
    assert output.dtype == torch.bfloat16
    expected = reference(query.float(), cache, table, weight.float(), 200, 32 ** -0.5)
    torch.testing.assert_close(output.double(), expected, rtol=3e-2, atol=3e-2)


def test_one_split_writes_directly_and_unserved_shapes_are_refused():
    query, cache, table, weight = make_case(20, 4, 2, 16, 32, seed=2)
    lengths = torch.tensor([20], dtype=torch.int32, device=DEVICE)
    output = torch.empty_like(query)
    assert decode_attention_partials(query, cache.key_caches[0], cache.value_caches[0], table[None], lengths, 20,
                                     0.25, num_splits=4, output=output, launch={"block_n": 32}) is None
    torch.testing.assert_close(output.reshape(1, -1).double() @ weight.double().T,
                               reference(query, cache, table, weight, 20, 0.25), rtol=1e-4, atol=1e-4)
    assert not fits_merge_output_projection(8, 2, 128, torch.zeros(64, 1024), torch.float32)  # 512-wide group
    assert not fits_merge_output_projection(8, 2, 64, torch.zeros(64, 512), torch.bfloat16)  # dtypes differ
    assert fits_merge_output_projection(8, 2, 64, torch.zeros(64, 512), torch.float32)
