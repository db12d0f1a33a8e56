"""When the Triton backend runs a batch-1 decode's attention and output projection as one kernel, and that the
result equals attending first and projecting after (Triton's interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

pytest.importorskip("triton", reason="triton is not installed")

from joule.kernels.attention_output import FUSED_MAX_CONTEXT  # noqa: E402
from joule.runtime.attention.base import AttentionMetadata, ForwardContext, KVCache  # noqa: E402
from joule.runtime.attention.portable import PortableAttentionBackend  # noqa: E402
from joule.runtime.attention.triton_backend import StaticDecodeMetadata, TritonAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, HIDDEN = 16, 8, 2, 16, 48


def _cache(num_blocks: int) -> KVCache:
    generator = torch.Generator().manual_seed(1)
    cache = KVCache.allocate(2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, torch.float32, DEVICE)
    for tensor in cache.key_caches + cache.value_caches:
        tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return cache


def _metadata(lengths: list[int], num_blocks_each: int) -> AttentionMetadata:
    count = len(lengths)
    tables = torch.arange(count * num_blocks_each, dtype=torch.int32).view(count, num_blocks_each).flip(1)
    return AttentionMetadata(
        query_start_locations=torch.arange(count + 1, device=DEVICE),
        slot_mapping=torch.zeros(count, dtype=torch.int64, device=DEVICE), block_tables=tables.contiguous().to(DEVICE),
        query_lengths=[1] * count, context_lengths=[length - 1 for length in lengths], sequence_lengths=lengths)


def _inputs(count: int = 1):
    generator = torch.Generator().manual_seed(2)
    query = torch.randn(count, NUM_HEADS, HEAD_DIM, generator=generator).to(DEVICE)
    weight = (torch.randn(HIDDEN, NUM_HEADS * HEAD_DIM, generator=generator) / HEAD_DIM).to(DEVICE)
    return query, weight


def test_one_decode_row_is_attended_and_projected_in_one_call():
    cache, metadata = _cache(8), _metadata([75], 8)
    query, weight = _inputs()
    context = ForwardContext(TritonAttentionBackend(fuse_output_projection=True), cache, metadata)
    fused = context.attend_and_project(1, query, weight, 0.25)
    separate = context.attend(1, query, None, None, 0.25, kv_stored=True).reshape(1, -1) @ weight.T
    assert fused is not None and fused.shape == (1, HIDDEN)
    torch.testing.assert_close(fused, separate, rtol=1e-4, atol=1e-5)


def test_a_graph_qualifies_by_its_length_bound():
    cache = _cache(8)
    query, weight = _inputs()
    plain = _metadata([40], 8)
    lengths = torch.tensor([40], dtype=torch.int32, device=DEVICE)
    backend = TritonAttentionBackend(fuse_output_projection=True)

    def static(bound: int) -> StaticDecodeMetadata:
        return StaticDecodeMetadata(plain.query_start_locations, plain.slot_mapping, plain.block_tables, [1], [39],
                                    [40], sequence_lengths_device=lengths, max_length_bound=bound, num_splits=1)

    short = backend.attend_and_project(0, query, weight, cache, static(FUSED_MAX_CONTEXT), 0.25)
    assert short is not None
    separate = backend.forward(0, query, None, None, cache, plain, 0.25, kv_stored=True).reshape(1, -1) @ weight.T
    torch.testing.assert_close(short, separate, rtol=1e-4, atol=1e-5)
    assert backend.attend_and_project(0, query, weight, cache, static(2 * FUSED_MAX_CONTEXT), 0.25) is None


def test_other_steps_fall_back_to_attend_then_project():
    cache = _cache(2 * (FUSED_MAX_CONTEXT // BLOCK_SIZE + 1))
    query, weight = _inputs()
    backend = TritonAttentionBackend(fuse_output_projection=True)
    two_rows, _ = _inputs(2)
    assert backend.attend_and_project(0, two_rows, weight, cache, _metadata([30, 31], 2), 0.25) is None
    long_context = _metadata([FUSED_MAX_CONTEXT + 1], FUSED_MAX_CONTEXT // BLOCK_SIZE + 1)
    assert backend.attend_and_project(0, query, weight, cache, long_context, 0.25) is None
    switched_off = TritonAttentionBackend(fuse_output_projection=False)
    assert switched_off.attend_and_project(0, query, weight, cache, _metadata([30], 2), 0.25) is None
    wide_group = torch.randn(HIDDEN, 2 * NUM_HEADS * HEAD_DIM, device=DEVICE)  # not this layer's projection
    assert backend.attend_and_project(0, query, wide_group, cache, _metadata([30], 2), 0.25) is None


def test_the_portable_backend_has_no_fused_path():
    query, weight = _inputs()
    context = ForwardContext(PortableAttentionBackend(), _cache(2), _metadata([20], 2))
    assert context.attend_and_project(0, query, weight, 0.25) is None


def test_the_environment_switch_sets_the_default(monkeypatch):
    from joule.runtime.attention.triton_backend import FUSED_OUTPUT_ENV

    monkeypatch.delenv(FUSED_OUTPUT_ENV, raising=False)
    assert TritonAttentionBackend().fuse_output_projection is False  # off until measured on a GPU
    monkeypatch.setenv(FUSED_OUTPUT_ENV, "1")
    assert TritonAttentionBackend().fuse_output_projection is True
    assert TritonAttentionBackend(fuse_output_projection=False).fuse_output_projection is False


@pytest.mark.parametrize("setting", ["heads_first=1", "block_n=32+num_warps=2+num_stages=1"])
def test_the_decode_launch_switch_keeps_the_attention(monkeypatch, setting):
    from joule.runtime.attention.triton_backend import DECODE_LAUNCH_ENV

    cache, metadata = _cache(16), _metadata([75, 33], 8)
    query, _ = _inputs(2)
    monkeypatch.delenv(DECODE_LAUNCH_ENV, raising=False)
    default = TritonAttentionBackend()
    assert default.decode_launch is None
    expected = default.forward(0, query, None, None, cache, metadata, 0.25, kv_stored=True)
    monkeypatch.setenv(DECODE_LAUNCH_ENV, setting)
    switched = TritonAttentionBackend()
    assert switched.decode_launch and set(switched.decode_launch) == {item.split("=")[0] for item in setting.split("+")}
    torch.testing.assert_close(switched.forward(0, query, None, None, cache, metadata, 0.25, kv_stored=True),
                               expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("setting", ["heads_first", "block_size=64", "num_warps=four"])
def test_a_bad_decode_launch_switch_names_the_variable(monkeypatch, setting):
    from joule.runtime.attention.triton_backend import DECODE_LAUNCH_ENV

    monkeypatch.setenv(DECODE_LAUNCH_ENV, setting)
    with pytest.raises(ValueError, match=DECODE_LAUNCH_ENV):
        TritonAttentionBackend()
