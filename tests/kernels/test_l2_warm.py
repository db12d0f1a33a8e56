"""What the batch-1 decode attention asks of L2 (``joule.kernels.l2_warm``): the ranges, the switch, the launch
arguments. The prefetch itself runs only on a Hopper GPU (tests/model/test_row_decode_cuda.py checks it changes
nothing; tests/kernels/test_compile_for_hopper.py that it compiles before the PDL wait)."""

from __future__ import annotations

import pytest
import torch

from joule.kernels.l2_warm import (
    MAX_RANGES,
    WARM_ENV,
    bulk_prefetch_available,
    decode_layer_warm_ranges,
    warm_arguments,
    warm_gate_up_bytes,
)


def test_ranges_cover_the_o_weight_and_the_first_gate_and_up_rows():
    output_weight = torch.randn(64, 48, dtype=torch.bfloat16)
    gate_up_weight = torch.randn(2 * 100, 64, dtype=torch.bfloat16)  # gate rows 0-99, up rows 100-199
    row_bytes = 64 * 2
    ranges = decode_layer_warm_ranges(output_weight, gate_up_weight, gate_up_bytes=20 * row_bytes + 5)
    assert [r.num_bytes for r in ranges] == [64 * 48 * 2, 10 * row_bytes, 10 * row_bytes]
    assert ranges[0].tensor.data_ptr() == output_weight.data_ptr()
    assert ranges[1].tensor.data_ptr() == gate_up_weight.data_ptr()
    assert ranges[2].tensor.data_ptr() == gate_up_weight[100].data_ptr()  # the up half's first row
    assert all(r.num_bytes % 16 == 0 for r in ranges)


def test_ranges_never_pass_the_gate_half_and_zero_bytes_warm_only_the_o_weight():
    output_weight = torch.randn(8, 8, dtype=torch.bfloat16)
    gate_up_weight = torch.randn(2 * 4, 8, dtype=torch.bfloat16)
    whole = decode_layer_warm_ranges(output_weight, gate_up_weight, gate_up_bytes=1 << 30)
    assert [r.num_bytes for r in whole] == [128, 64, 64]  # 4 rows of 16 bytes each half
    assert len(decode_layer_warm_ranges(output_weight, gate_up_weight, gate_up_bytes=0)) == 1


def test_switch_reads_megabytes_and_names_itself_when_wrong(monkeypatch):
    monkeypatch.delenv(WARM_ENV, raising=False)
    assert warm_gate_up_bytes() is None
    monkeypatch.setenv(WARM_ENV, "1.5")
    assert warm_gate_up_bytes() == 3 << 19
    monkeypatch.setenv(WARM_ENV, "0")
    assert warm_gate_up_bytes() == 0
    for bad in ("lots", "-2"):
        monkeypatch.setenv(WARM_ENV, bad)
        with pytest.raises(ValueError, match=WARM_ENV):
            warm_gate_up_bytes()


def test_arguments_fill_unused_slots_with_zero_bytes():
    fallback = torch.zeros(1)
    weight = torch.zeros(4)
    ranges = decode_layer_warm_ranges(torch.zeros(4, 4, dtype=torch.bfloat16), torch.zeros(0, 4), 0)
    arguments = warm_arguments(ranges, fallback)
    assert len(arguments) == 2 * MAX_RANGES
    assert arguments[1] == 32 and arguments[2:] == [fallback, 0, fallback, 0]
    with pytest.raises(ValueError, match="at most"):
        warm_arguments(ranges * 4, weight)


def test_no_bulk_prefetch_off_hopper():
    assert not bulk_prefetch_available(torch.device("cpu"))
