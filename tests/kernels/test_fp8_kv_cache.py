"""An fp8 (e4m3) KV cache: writes saturate like torch's cast, and both attention backends read it alike."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.common import interpreting  # noqa: E402
from joule.kernels.kv_write import write_kv_cache  # noqa: E402
from joule.kernels.reference import paged_attention_reference  # noqa: E402
from joule.runtime.attention.base import AttentionMetadata, KVCache  # noqa: E402
from joule.runtime.attention.portable import PortableAttentionBackend  # noqa: E402
from joule.runtime.attention.triton_backend import TritonAttentionBackend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FP8 = torch.float8_e4m3fn


def _batch(steps, num_heads, num_kv_heads, head_dim, block_size, dtype, seed):
    """Sequences laid out in consecutive blocks; the cache holds fp8 noise, the new rows are ``dtype``."""
    generator = torch.Generator().manual_seed(seed)
    tables, next_block = [], 0
    for context, new in steps:
        count = -(-(context + new) // block_size)
        tables.append(list(range(next_block, next_block + count))[::-1])  # reversed: not contiguous in order
        next_block += count
    shape = (next_block + 1, block_size, num_kv_heads, head_dim)
    cache = KVCache([(torch.randn(shape, generator=generator) * 2).to(DEVICE, FP8)],
                    [(torch.randn(shape, generator=generator) * 2).to(DEVICE, FP8)], block_size)
    width = max(len(table) for table in tables)
    block_tables = torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.int32)
    slots = [table[p // block_size] * block_size + p % block_size
             for table, (context, new) in zip(tables, steps) for p in range(context, context + new)]
    lengths = [new for _, new in steps]
    tokens = sum(lengths)
    metadata = AttentionMetadata(
        query_start_locations=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), device=DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        block_tables=block_tables.to(DEVICE), query_lengths=lengths,
        context_lengths=[context for context, _ in steps],
        sequence_lengths=[context + new for context, new in steps],
    )

    def rows(heads):
        return (torch.randn(tokens, heads, head_dim, generator=generator) * 3).to(DEVICE, dtype)

    return rows(num_heads), rows(num_kv_heads), rows(num_kv_heads), cache, metadata


def assert_same_fp8(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Bit-equal on a GPU. Triton's CPU interpreter (3.9) emulates the cast loosely: ties round away
    from zero, not to even, and the carry is dropped when rounding up reaches a power of two (1.97 ->
    1.0, not 2.0). There, an element may be one fp8 step off, or half of a power-of-two result."""
    different = actual.view(torch.uint8) != expected.view(torch.uint8)
    if interpreting():
        want, got = expected.float(), actual.float()
        mantissa, exponent = torch.frexp(want)
        step = torch.clamp(torch.exp2(exponent.float() - 4), min=2**-9)  # e4m3: 3 mantissa bits
        dropped_carry = (mantissa.abs() == 0.5) & (got == want / 2)
        different &= ~(dropped_carry | ((got - want).abs() <= step))
    assert not different.any(), f"{int(different.sum())} cache elements differ"


def test_fp8_write_saturates_like_torch_cast():
    query, key, value, cache, metadata = _batch([(5, 9), (0, 20)], 4, 2, 32, 16, torch.bfloat16, seed=1)
    key[0, 0, :4] = torch.tensor([1000.0, -1000.0, 448.0, 3.3], dtype=torch.bfloat16)
    expected_keys, expected_values = cache.key_caches[0].clone(), cache.value_caches[0].clone()
    for expected, rows in ((expected_keys, key), (expected_values, value)):
        flat = expected.view(-1, expected.shape[2], expected.shape[3])
        flat[metadata.slot_mapping] = rows.float().clamp(-448, 448).to(FP8)
    write_kv_cache(key, value, cache.key_caches[0], cache.value_caches[0], metadata.slot_mapping)
    assert_same_fp8(cache.key_caches[0], expected_keys)
    assert_same_fp8(cache.value_caches[0], expected_values)
    first = cache.key_caches[0].view(-1, 2, 32)[metadata.slot_mapping[0], 0, :2].float()
    assert first.tolist() == [448.0, -448.0]


@pytest.mark.parametrize("steps", [[(0, 1), (31, 1), (40, 1)], [(9, 1), (0, 12), (20, 5), (64, 1)]])
def test_backends_agree_on_an_fp8_cache(steps):
    outputs = []
    for backend in (PortableAttentionBackend(), TritonAttentionBackend(decode_num_splits=2)):
        query, key, value, cache, metadata = _batch(steps, 8, 2, 32, 16, torch.bfloat16, seed=3)
        output = backend.forward(0, query, key, value, cache, metadata, 32**-0.5)
        assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()
        outputs.append((output, cache))
    assert_same_fp8(outputs[1][1].key_caches[0], outputs[0][1].key_caches[0])
    assert_same_fp8(outputs[1][1].value_caches[0], outputs[0][1].value_caches[0])
    for output, cache in outputs:  # each against dense attention over the fp8 values it wrote and read
        expected = paged_attention_reference(query, cache.key_caches[0].float(), cache.value_caches[0].float(),
                                             metadata.block_tables, metadata.query_lengths,
                                             metadata.sequence_lengths, 32**-0.5)
        torch.testing.assert_close(output.double().cpu(), expected.double().cpu(), atol=3e-2, rtol=3e-2)


def test_kv_cache_dtype_option_is_validated():
    assert KVCache.resolve_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert KVCache.resolve_dtype("fp8", torch.bfloat16) == FP8
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        KVCache.resolve_dtype("int4", torch.bfloat16)


def _native_convert() -> bool:
    from joule.kernels.paged_decode import native_fp8_convert

    return native_fp8_convert(torch.device(DEVICE))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fp8_launch_variants_match_float32_attention_on_an_fp8_cache(num_splits):
    """The fp8 cache's launch variants read the attention computed by hand in float32, within 16-bit rounding:
    bf16 dots after ``.to()``, fp16 dots (``fp16_dot``), and on GPUs that have it (sm_89+) the hardware's
    paired convert in registers (``fp8_asm``, their default; inline PTX, so not under the interpreter)."""
    from joule.kernels.paged_decode import paged_decode_attention

    generator = torch.Generator().manual_seed(11)
    num_heads, num_kv_heads, head_dim, block_size, batch = 4, 2, 32, 16, 3
    lengths = [40, 7, 65]
    blocks = [-(-length // block_size) for length in lengths]
    tables = torch.zeros(batch, max(blocks), dtype=torch.int32)
    next_block = 0
    for row, count in enumerate(blocks):
        tables[row, :count] = torch.arange(next_block + count - 1, next_block - 1, -1)
        next_block += count
    shape = (next_block, block_size, num_kv_heads, head_dim)
    keys = (torch.randn(shape, generator=generator) * 2).to(DEVICE, FP8)
    values = (torch.randn(shape, generator=generator) * 2).to(DEVICE, FP8)
    query = (torch.randn(batch, num_heads, head_dim, generator=generator)).to(DEVICE, torch.bfloat16)
    sequence_lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    tables = tables.to(DEVICE)
    variants = [{"fp16_dot": False, "fp8_asm": False}, {"fp16_dot": True, "fp8_asm": False}]
    if _native_convert():
        variants += [{"fp8_asm": True}, {}]  # {}: the default picks fp8_asm here
    outputs = [paged_decode_attention(query, keys, values, tables, sequence_lengths, max(lengths), head_dim**-0.5,
                                      num_splits=num_splits, launch={"block_n": 16, **variant})
               for variant in variants]
    group = num_heads // num_kv_heads
    for row, length in enumerate(lengths):  # float32 attention over the row's blocks, by hand
        positions = torch.arange(length)
        block_ids = tables[row].cpu()[positions // block_size].long()
        key = keys.float().cpu()[block_ids, positions % block_size].repeat_interleave(group, dim=1)
        value = values.float().cpu()[block_ids, positions % block_size].repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,thd->ht", query[row].float().cpu(), key) * head_dim**-0.5
        expected = torch.einsum("ht,thd->hd", scores.softmax(dim=-1), value)
        for output in outputs:
            torch.testing.assert_close(output[row].float().cpu(), expected, atol=3e-2, rtol=3e-2)


def test_fp8_asm_is_refused_where_it_cannot_run():
    from joule.kernels.paged_decode import native_fp8_convert, paged_decode_attention

    assert native_fp8_convert(torch.device("cpu")) is False
    if _native_convert():
        pytest.skip("this GPU converts fp8 natively")
    keys = torch.zeros(2, 16, 1, 16, dtype=FP8, device=DEVICE)
    query = torch.zeros(1, 1, 16, dtype=torch.bfloat16, device=DEVICE)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=DEVICE)
    lengths = torch.ones(1, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="fp8_asm"):
        paged_decode_attention(query, keys, keys, tables, lengths, 1, 0.25, launch={"fp8_asm": True})
