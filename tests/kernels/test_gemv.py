"""The batch-1 GEMV against F.linear: odd sizes, masks on both axes, bias, and its block heuristic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.gemv import GemvConfig, gemv, gemv_config  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_features,in_features,config", [
    (48, 64, GemvConfig(16, 32, 4, 1)),
    (37, 100, GemvConfig(8, 32, 4, 1)),   # neither dimension a multiple of its block
    (5, 256, GemvConfig(4, 128, 2, 1)),
    (96, 80, None),                       # the heuristic's blocks
])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(dtype, out_features, in_features, config, with_bias):
    generator = torch.Generator().manual_seed(out_features * in_features)
    weight = torch.randn(out_features, in_features, generator=generator).to(DEVICE, dtype)
    x = torch.randn(1, in_features, generator=generator).to(DEVICE, dtype)
    bias = torch.randn(out_features, generator=generator).to(DEVICE, dtype) if with_bias else None
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    output = gemv(x, weight, bias, config=config)
    assert output.shape == (1, out_features) and output.dtype == dtype
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(output.float(), expected, atol=tolerance * in_features ** 0.5, rtol=tolerance)


@pytest.mark.parametrize("in_features", [40, 100, 256])  # 2, 4 and 8 tiles of 32 columns; 40: the second is partial
def test_gemv_prefetched_tiles_add_in_the_loop_order(in_features):
    """Loading 1 or 2 weight tiles before the wait changes nothing: bit-identical to no prefetch."""
    generator = torch.Generator().manual_seed(in_features)
    weight = torch.randn(29, in_features, generator=generator).to(DEVICE, torch.bfloat16)
    x = torch.randn(1, in_features, generator=generator).to(DEVICE, torch.bfloat16)
    outputs = [gemv(x, weight, config=GemvConfig(8, 32, 4, 1, prefetch_tiles=tiles)) for tiles in (0, 1, 2)]
    expected = F.linear(x.float(), weight.float())
    torch.testing.assert_close(outputs[0].float(), expected, atol=0.2, rtol=3e-2)
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_gemv_rejects_more_than_one_row():
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(torch.ones(2, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be"):
        gemv(torch.ones(1, 8, device=DEVICE), torch.ones(4, 6, device=DEVICE))
    with pytest.raises(ValueError, match="prefetch_tiles"):
        gemv(torch.ones(1, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE), config=GemvConfig(4, 8, 1, 1, 3))


def test_gemv_config_keeps_several_programs_per_sm():
    narrow = gemv_config(2048, 2048, num_sms=132)
    assert (2048 + narrow.block_n - 1) // narrow.block_n >= 4 * 132 or narrow.block_n == 2
    wide = gemv_config(128256, 2048, num_sms=132)
    assert wide.block_n == 32 and wide.block_k == 512
    assert gemv_config(1000, 100).block_k == 128  # never wider than the input rounded up
