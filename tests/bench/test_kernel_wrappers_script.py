"""benchmarks/cpu/kernel_wrappers.py: it times every wrapper with launches stubbed, and puts the kernels back."""

from __future__ import annotations

import pytest
from helpers.scripts import BENCHMARKS, load_script

pytest.importorskip("triton", reason="triton is not installed")

script = load_script(BENCHMARKS / "cpu" / "kernel_wrappers.py", "kernel_wrappers")


def test_wrappers_are_timed_and_the_kernels_restored():
    before = [getattr(module, name) for module, name in script.KERNELS]
    result = script.time_wrappers(decodes=3, chunks=2, chunk_len=20, number=2)
    assert set(result) == {"rms_norm", "rotary + cache write", "attention (decode + prefill)", "silu_and_mul",
                           "layer (two norms)"}
    assert all(micros > 0 for micros in result.values())
    assert [getattr(module, name) for module, name in script.KERNELS] == before
