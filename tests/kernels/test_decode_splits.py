"""Decode attention's split-count rules (host side): the wave-balanced candidate raises ``choose_num_splits``'s count
only where the programs leave the last wave of processors mostly idle, and ``decode_num_splits`` picks the rule."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed")

from joule.kernels.paged_decode import (  # noqa: E402
    choose_num_splits,
    decode_num_splits,
    wave_balanced_splits,
)


def test_a_ragged_last_wave_gets_more_splits():
    # 40 rows x 8 KV heads = 320 programs on 132 processors fill 2.4 of 3 waves; two splits fill 4.85 of 5
    assert choose_num_splits(40, 8, 1024, 132) == 1
    assert wave_balanced_splits(40, 8, 1024, 132) == 2
    assert wave_balanced_splits(50, 8, 2048, 132) == 3  # 400 programs: 0.76, then 0.87, then 0.91 filled


def test_full_waves_and_the_current_rule_are_kept():
    for rows in (64, 100, 160, 256):  # >= 85 % of the last wave filled already
        assert wave_balanced_splits(rows, 8, 2048, 132) == choose_num_splits(rows, 8, 2048, 132)
    assert wave_balanced_splits(1, 8, 2048, 132) == choose_num_splits(1, 8, 2048, 132)


def test_splits_never_go_below_the_shortest_split():
    assert wave_balanced_splits(40, 8, 128, 132) == 1  # 128 tokens cannot be split in two 128-token ranges


def test_the_environment_picks_the_rule(monkeypatch):
    monkeypatch.delenv("JOULE_DECODE_SPLITS", raising=False)
    assert decode_num_splits(40, 8, 1024, 132) == 1
    monkeypatch.setenv("JOULE_DECODE_SPLITS", "wave")
    assert decode_num_splits(40, 8, 1024, 132) == 2
