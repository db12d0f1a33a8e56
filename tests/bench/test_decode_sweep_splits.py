"""benchmarks/gpu/decode_sweep.py's candidate split rule (CPU): it raises the current rule's count only where the
programs leave the last wave of processors mostly idle, and never below the shortest split allowed."""

from __future__ import annotations

from helpers.scripts import BENCHMARKS, load_script

from joule.kernels.paged_decode import choose_num_splits

sweep = load_script(BENCHMARKS / "gpu" / "decode_sweep.py", "decode_sweep")


def test_a_ragged_last_wave_gets_more_splits():
    # 40 rows x 8 KV heads = 320 programs on 132 processors fill 2.4 of 3 waves; two splits fill 4.85 of 5
    assert choose_num_splits(40, 8, 1024, 132) == 1
    assert sweep.wave_balanced_splits(40, 8, 1024, 132) == 2
    assert sweep.wave_balanced_splits(50, 8, 2048, 132) == 3  # 400 programs: 0.76, then 0.87, then 0.91 filled


def test_full_waves_and_the_current_rule_are_kept():
    for rows in (64, 100, 160, 256):  # >= 85 % of the last wave filled already
        assert sweep.wave_balanced_splits(rows, 8, 2048, 132) == choose_num_splits(rows, 8, 2048, 132)
    assert sweep.wave_balanced_splits(1, 8, 2048, 132) == choose_num_splits(1, 8, 2048, 132)


def test_splits_never_go_below_the_shortest_split():
    assert sweep.wave_balanced_splits(40, 8, 128, 132) == 1  # 128 tokens cannot be split in two 128-token ranges
