"""The batch-1 GEMV against F.linear: odd sizes, masks on both axes, bias, and its block heuristic."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.gemv import GemvConfig, gemv, gemv_config, head_tiles  # noqa: E402

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


@pytest.mark.parametrize("in_features", [100, 256])  # a head of 4 or 8 tiles of 32 columns, or the whole padded row
@pytest.mark.parametrize("gated", [False, True])
def test_gemv_wide_head_tiles_sum_the_same_products(in_features, gated):
    """A head of 4 or 8 tiles (summed as a tree, not in the loop's order) agrees with no head to float32 rounding."""
    generator = torch.Generator().manual_seed(in_features + gated)
    weight = torch.randn(32, in_features, generator=generator).to(DEVICE, torch.float32)
    x = torch.randn(1, in_features, generator=generator).to(DEVICE, torch.float32)
    outputs = [gemv(x, weight, config=GemvConfig(8, 32, 4, 1, prefetch_tiles=tiles), gated=gated)
               for tiles in (0, 4, 8)]
    for output in outputs[1:]:
        torch.testing.assert_close(output, outputs[0], atol=1e-5, rtol=1e-5)
        assert output.abs().sum() > 0


def test_head_tiles_are_capped_by_the_row_and_follow_the_override_for_narrow_programs(monkeypatch):
    monkeypatch.delenv("JOULE_GEMV_HEAD_COLUMNS", raising=False)
    assert head_tiles(2, 512, 2048, 2) == 2 and head_tiles(8, 512, 2048, 2) == 4 and head_tiles(0, 512, 2048, 2) == 0
    assert head_tiles(4, 32, 40, 8) == 2  # 40 columns pad to 64: two tiles hold the whole row
    monkeypatch.setenv("JOULE_GEMV_HEAD_COLUMNS", "2048")
    # Llama-3.2-1B's batch-1 programs: q/k/v (4 rows), o (2 rows), down (1 row of 8192) take the head ...
    assert head_tiles(1, 512, 2048, 4) == 4 and head_tiles(2, 512, 2048, 2) == 4 and head_tiles(2, 512, 8192, 1) == 4
    assert head_tiles(2, 256, 2048, 8) == 2  # ... the gated gate/up's 8-row (32 KB) programs keep theirs
    monkeypatch.setenv("JOULE_GEMV_HEAD_COLUMNS", "0")
    assert head_tiles(2, 512, 2048, 2) == 0
    monkeypatch.setenv("JOULE_GEMV_HEAD_COLUMNS", "128")
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(24, 256, generator=generator).to(DEVICE, torch.float32)
    x = torch.randn(1, 256, generator=generator).to(DEVICE, torch.float32)
    torch.testing.assert_close(gemv(x, weight, config=GemvConfig(8, 32, 4, 1)), F.linear(x, weight),
                               atol=1e-4, rtol=1e-4)


def test_gemv_rejects_more_than_one_row():
    with pytest.raises(ValueError, match="one contiguous row"):
        gemv(torch.ones(2, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be"):
        gemv(torch.ones(1, 8, device=DEVICE), torch.ones(4, 6, device=DEVICE))
    with pytest.raises(ValueError, match="prefetch_tiles"):
        gemv(torch.ones(1, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE), config=GemvConfig(4, 8, 1, 1, 3))


def test_gemv_config_keeps_several_programs_per_sm():
    narrow = gemv_config(2048, 2048, num_sms=132)
    assert (2048 + narrow.block_n - 1) // narrow.block_n >= 8 * 132 and narrow.block_n == 1  # layer_chain_sweep
    assert gemv_config(2048, 8192, num_sms=132).block_n == 1  # a 2-row block would read 32 KB a program
    assert gemv_config(3072, 2048, num_sms=132).block_n == 2
    wide = gemv_config(128256, 2048, num_sms=132)
    assert wide.block_n == 8 and wide.block_k == 256 and wide.num_stages == 1  # gemv_sweep's best on the H200
    gate_up = gemv_config(16384, 2048, num_sms=132, gated=True)
    assert gate_up.block_n == 4 and gate_up.block_k == 512 and gate_up.num_stages == 1  # layer_chain_sweep's best
    assert gemv_config(1000, 100).block_k == 128  # never wider than the input rounded up


@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("in_features,config", [(96, GemvConfig(8, 32, 4, 1)), (100, None)])
def test_gemv_with_norm_matches_rms_norm_then_gemv(with_residual, in_features, config):
    """The fused RMSNorm prologue gives rms_norm's rounded input (and its new residual) to the same GEMV."""
    from joule.kernels.rms_norm import rms_norm

    generator = torch.Generator().manual_seed(in_features + with_residual)
    weight = torch.randn(37, in_features, generator=generator).to(DEVICE, torch.bfloat16)
    hidden = torch.randn(1, in_features, generator=generator).to(DEVICE, torch.bfloat16)
    residual = torch.randn(1, in_features, generator=generator).to(DEVICE, torch.bfloat16) if with_residual else None
    norm_weight = (1 + 0.1 * torch.randn(in_features, generator=generator)).to(DEVICE, torch.bfloat16)
    if with_residual:
        normed, expected_residual = rms_norm(hidden, norm_weight, 1e-5, residual)
        output, new_residual = gemv(hidden, weight, config=config, norm_weight=norm_weight, eps=1e-5,
                                    residual=residual)
        assert torch.equal(new_residual, expected_residual)
    else:
        normed = rms_norm(hidden, norm_weight, 1e-5)
        output = gemv(hidden, weight, config=config, norm_weight=norm_weight, eps=1e-5)
    expected = gemv(normed, weight, config=config)
    torch.testing.assert_close(output, expected, atol=0, rtol=0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gated_gemv_matches_gemv_then_silu_and_mul(with_bias):
    from joule.kernels.activation import silu_and_mul

    generator = torch.Generator().manual_seed(7 + with_bias)
    weight = torch.randn(2 * 45, 64, generator=generator).to(DEVICE, torch.bfloat16)  # 45 gate over 45 up rows
    x = torch.randn(1, 64, generator=generator).to(DEVICE, torch.bfloat16)
    bias = torch.randn(90, generator=generator).to(DEVICE, torch.bfloat16) if with_bias else None
    config = GemvConfig(16, 32, 4, 1)
    output = gemv(x, weight, bias, config=config, gated=True)
    expected = silu_and_mul(gemv(x, weight, bias, config=GemvConfig(8, 32, 4, 1)))
    assert output.shape == (1, 45)
    torch.testing.assert_close(output, expected, atol=0, rtol=0)
    reference = F.silu(F.linear(x.float(), weight[:45].float())) * F.linear(x.float(), weight[45:].float())
    if bias is None:
        torch.testing.assert_close(output.float(), reference, atol=0.1, rtol=3e-2)


def test_gemv_rejects_inconsistent_fusions():
    x, weight = torch.ones(1, 8, device=DEVICE), torch.ones(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        gemv(x, weight, residual=torch.ones(1, 8, device=DEVICE))  # a residual without a norm
    with pytest.raises(ValueError, match="norm_weight"):
        gemv(x, weight, norm_weight=torch.ones(6, device=DEVICE))
    with pytest.raises(ValueError, match="gated"):
        gemv(x, torch.ones(5, 8, device=DEVICE), gated=True)


def test_l2_prefetch_lines_cover_a_weight_row_only_when_switched_on_under_pdl(monkeypatch):
    from joule.kernels import common

    monkeypatch.delenv("JOULE_GEMV_L2_PREFETCH", raising=False)
    assert common.gemv_l2_prefetch_lines(True, 2048, 2) == 0  # off by default
    monkeypatch.setenv("JOULE_GEMV_L2_PREFETCH", "1")
    assert [common.gemv_l2_prefetch_lines(True, k, size) for k, size in
            ((2048, 2), (8192, 2), (3000, 2), (2048, 4))] == [32, 128, 64, 64]  # 128-byte lines, power of two
    assert common.gemv_l2_prefetch_lines(False, 2048, 2) == 0  # only before a PDL wait


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the prefetch is PTX)")
@pytest.mark.parametrize("gated", [False, True])
def test_gemv_with_l2_prefetch_gives_the_same_bits(monkeypatch, gated):
    generator = torch.Generator(device=DEVICE).manual_seed(5)
    x = torch.randn(1, 2048, device=DEVICE, dtype=torch.bfloat16, generator=generator)
    weight = torch.randn(4096, 2048, device=DEVICE, dtype=torch.bfloat16, generator=generator) * 0.02
    norm = torch.rand(2048, device=DEVICE, dtype=torch.bfloat16, generator=generator) + 0.5
    monkeypatch.setenv("JOULE_GEMV_L2_PREFETCH", "0")
    plain = gemv(x, weight, norm_weight=norm, gated=gated)
    monkeypatch.setenv("JOULE_GEMV_L2_PREFETCH", "1")
    assert torch.equal(gemv(x, weight, norm_weight=norm, gated=gated), plain)
