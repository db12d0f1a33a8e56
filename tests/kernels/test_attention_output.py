"""The fused batch-1 decode attention + output projection against the reference attention and F.linear.

Random caches (never zeros), shuffled block tables, GQA ratios 1 to 4, contexts crossing block and tile
edges, head-major cache layouts and row blocks that leave a ragged last block. On CPU: Triton's interpreter.
"""

from __future__ import annotations

import random

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.attention_output import decode_attention_output, fits_fused_attention_output  # noqa: E402
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
