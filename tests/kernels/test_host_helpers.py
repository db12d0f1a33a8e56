"""Host-side helpers of the kernel wrappers."""

from __future__ import annotations

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def test_host_helpers_match_tritons():
    """The wrappers' plain ``next_power_of_2`` and ``cdiv`` give what Triton's (slower to call) give."""
    import triton

    from joule.kernels.common import cdiv, next_power_of_2

    for value in [0, 1, 2, 3, 5, 16, 17, 1000, 1024, 1025, 151936, 1 << 40]:
        assert next_power_of_2(value) == triton.next_power_of_2(value)
        for divisor in (1, 3, 16, 128):
            assert cdiv(value, divisor) == triton.cdiv(value, divisor)
