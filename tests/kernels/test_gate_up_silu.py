"""The fused gate/up + SiLU GEMM against the unfused path's rounding, and the plain TMA GEMM beside it (Triton's
interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.activation import silu_and_mul  # noqa: E402
from joule.kernels.gate_up_config import GateUpTile  # noqa: E402
from joule.kernels.gate_up_silu import gate_up_silu, tma_linear  # noqa: E402
from joule.kernels.reference import silu_and_mul_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = GateUpTile(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=2, group_m=2, persistent=False)


def _operands(rows: int, hidden: int, intermediate: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, hidden, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(2 * intermediate, hidden, generator=generator) / hidden**0.5).to(DEVICE, dtype)
    return x, weight


def _unfused(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The engine's path: the GEMM rounded to the activation dtype, then SiLU-and-mul in float32, rounded once."""
    projected = (x.float() @ weight.float().T).to(x.dtype)
    return silu_and_mul_reference(projected) if DEVICE == "cpu" else silu_and_mul(projected)


@pytest.mark.parametrize("rows,hidden,intermediate",
                         [(1, 32, 16), (37, 48, 40), (64, 64, 32), (70, 32, 56), (5, 24, 8)])
@pytest.mark.parametrize("persistent,flatten,warp_specialize,stacked",
                         [(False, False, False, False), (True, False, False, False), (True, True, False, False),
                          (True, False, True, False), (False, False, False, True), (True, False, False, True)])
def test_fused_gate_up_silu_matches_the_unfused_rounding(rows, hidden, intermediate, persistent, flatten,
                                                         warp_specialize, stacked):
    from joule.kernels import gate_up_silu as module

    x, weight = _operands(rows, hidden, intermediate, torch.bfloat16, seed=rows + intermediate)
    tile = GateUpTile(**{**SMALL.__dict__, "persistent": persistent, "flatten": flatten,
                         "warp_specialize": warp_specialize, "stacked": stacked})
    if warp_specialize and DEVICE == "cuda" and module._triton_version() < (3, 7):  # refused there (see below)
        with pytest.raises(ValueError, match="Triton 3.7"):
            gate_up_silu(x, weight, tile)
        return
    fused = gate_up_silu(x, weight, tile)
    assert fused.shape == (rows, intermediate) and fused.dtype == torch.bfloat16
    expected = _unfused(x, weight)
    assert expected.abs().max() > 0.1  # random inputs, not a zero tensor both sides would match
    torch.testing.assert_close(fused.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_fused_gate_up_silu_in_float32_matches_closely():
    x, weight = _operands(33, 32, 24, torch.float32, seed=5)
    gate, up = (x @ weight.T).chunk(2, dim=-1)
    torch.testing.assert_close(gate_up_silu(x, weight, SMALL), torch.nn.functional.silu(gate) * up,
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("max_programs", [1, 3])
def test_fewer_persistent_programs_walk_every_tile(max_programs):
    x, weight = _operands(50, 32, 40, torch.bfloat16, seed=13)  # 4 x 3 tiles of 16 x 16
    tile = GateUpTile(**{**SMALL.__dict__, "persistent": True})
    torch.testing.assert_close(gate_up_silu(x, weight, tile, max_programs=max_programs).float(),
                               _unfused(x, weight).float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="max_programs"):
        gate_up_silu(x, weight, tile, max_programs=0)


@pytest.mark.parametrize("rows,hidden,out_features", [(1, 32, 16), (45, 48, 40), (70, 32, 72)])
@pytest.mark.parametrize("persistent,max_programs,warp_specialize",
                         [(False, None, False), (True, None, False), (True, 2, False), (True, 2, True)])
def test_the_plain_tma_gemm_matches_a_rounded_matmul(rows, hidden, out_features, persistent, max_programs,
                                                     warp_specialize):
    generator = torch.Generator().manual_seed(rows * out_features)
    x = torch.randn(rows, hidden, generator=generator).to(DEVICE, torch.bfloat16)
    weight = (torch.randn(out_features, hidden, generator=generator) / hidden**0.5).to(DEVICE, torch.bfloat16)
    tile = GateUpTile(**{**SMALL.__dict__, "persistent": persistent, "warp_specialize": warp_specialize})
    result = tma_linear(x, weight, tile, max_programs=max_programs)
    expected = (x.float() @ weight.float().T).to(torch.bfloat16)
    assert result.shape == (rows, out_features) and expected.abs().max() > 0.5
    torch.testing.assert_close(result.float(), expected.float(), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="tma_linear: weight"):
        tma_linear(x, weight[:, :-8], tile)


def test_no_rows_gives_an_empty_output():
    x, weight = _operands(0, 32, 16, torch.bfloat16, seed=1)
    assert gate_up_silu(x, weight, SMALL).shape == (0, 16)


@pytest.mark.parametrize("change,message", [
    (lambda x, w: (x.t(), w), "hidden must be"),
    (lambda x, w: (x, w[:-1]), "weight"),
    (lambda x, w: (x, w.float()), "dtype"),
    (lambda x, w: (x, torch.cat([w[:12], w[16:28]])), "16 bytes"),  # I = 12: 24-byte output rows
])
def test_bad_operands_are_named(change, message):
    x, weight = _operands(8, 32, 16, torch.bfloat16, seed=2)
    with pytest.raises(ValueError, match=message):
        gate_up_silu(*change(x, weight), SMALL)


def test_the_setting_names_a_tile_or_turns_the_kernel_off(monkeypatch):
    from joule.kernels.gate_up_config import DEFAULT_TILE, FUSED_GATE_UP_ENV, fused_gate_up_tile, tile_setting

    for default in ("", "1"):  # on by default (measured faster on the H100)
        monkeypatch.setenv(FUSED_GATE_UP_ENV, default)
        assert fused_gate_up_tile() == DEFAULT_TILE
    monkeypatch.delenv(FUSED_GATE_UP_ENV)
    assert fused_gate_up_tile() == DEFAULT_TILE and DEFAULT_TILE.persistent
    monkeypatch.setenv(FUSED_GATE_UP_ENV, "0")
    assert fused_gate_up_tile() is None
    tile = GateUpTile(128, 64, 64, 4, 4, 8, persistent=True)
    assert tile_setting(tile) == "128x64x64x4x4x8x1"
    monkeypatch.setenv(FUSED_GATE_UP_ENV, tile_setting(tile))
    assert fused_gate_up_tile() == tile
    flattened = GateUpTile(128, 64, 64, 4, 4, 8, persistent=True, flatten=True)
    assert tile_setting(flattened) == "128x64x64x4x4x8x1x1x0x0"
    monkeypatch.setenv(FUSED_GATE_UP_ENV, tile_setting(flattened))
    assert fused_gate_up_tile() == flattened
    monkeypatch.setenv(FUSED_GATE_UP_ENV, "128x64x64x4x4x8x1x1")  # the flatten switch alone, as (o) wrote it
    assert fused_gate_up_tile() == flattened
    specialized = GateUpTile(128, 128, 64, 4, 3, 8, persistent=True, warp_specialize=True)
    assert tile_setting(specialized) == "128x128x64x4x3x8x1x0x1x0"
    monkeypatch.setenv(FUSED_GATE_UP_ENV, tile_setting(specialized))
    assert fused_gate_up_tile() == specialized
    monkeypatch.setenv(FUSED_GATE_UP_ENV, "128x128x64x4x3x8x1x0x1")  # before the stacking switch
    assert fused_gate_up_tile() == specialized
    stacked = GateUpTile(128, 128, 64, 8, 3, 8, persistent=True, stacked=True)
    assert tile_setting(stacked) == "128x128x64x8x3x8x1x0x0x1"
    monkeypatch.setenv(FUSED_GATE_UP_ENV, tile_setting(stacked))
    assert fused_gate_up_tile() == stacked
    for bad in ("yes", "128x64x64", "128x64x64x4x4x8xtrue"):
        monkeypatch.setenv(FUSED_GATE_UP_ENV, bad)
        with pytest.raises(ValueError, match=FUSED_GATE_UP_ENV):
            fused_gate_up_tile()


def test_the_mlp_takes_the_tile_from_the_setting_and_keeps_cpu_steps_unfused(monkeypatch):
    from joule.model.layers import GatedMLP

    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "64x64x64x4x4x8x0")
    mlp = GatedMLP(32, 48)
    mlp.merge_projections(False)
    assert mlp.fused_tile == GateUpTile(64, 64, 64, 4, 4, 8, False)
    hidden = torch.randn(2048, 32)
    assert not mlp.gate_up_proj.runs_fused_gate_up(hidden)  # a CPU step: cuBLAS's place is the CPU BLAS's
    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "0")
    plain = GatedMLP(32, 48)
    plain.merge_projections(False)
    assert plain.fused_tile is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_long_cuda_step_runs_the_fused_kernel_and_matches_the_unfused_mlp(monkeypatch):
    from joule.model.layers import GatedMLP, RMSNorm, norm_then_project

    generator = torch.Generator().manual_seed(9)
    mlp = GatedMLP(256, 512)
    for parameter in mlp.parameters():
        parameter.data = torch.randn(parameter.shape, generator=generator) * 0.05
    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "1")
    mlp.merge_projections(False)
    mlp = mlp.to("cuda", torch.bfloat16)
    norm = RMSNorm(256, 1e-6).to("cuda", torch.bfloat16)
    hidden = torch.randn(1500, 256, generator=generator).to("cuda", torch.bfloat16)
    residual = torch.randn(1500, 256, generator=generator).to("cuda", torch.bfloat16)
    fused, fused_residual = norm_then_project(mlp.gate_up_proj, norm, hidden, residual, gated=True,
                                              fused_tile=mlp.fused_tile)
    unfused, unfused_residual = norm_then_project(mlp.gate_up_proj, norm, hidden, residual, gated=True)
    assert torch.equal(fused_residual, unfused_residual)
    torch.testing.assert_close(fused.float(), unfused.float(), rtol=2e-2, atol=2e-2)
    normed, _ = norm(hidden, residual)
    torch.testing.assert_close(mlp(normed).float(), mlp.down_proj(unfused).float(), rtol=3e-2, atol=3e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_warp_specialized_tiles_are_exact_at_engine_sizes(stages):
    """Full 128 x 128 tiles over many persistent rounds: where a pipeline race would show (an H200 gave NaNs at three
    stages with the up rows loaded through the gate rows' descriptor)."""
    from joule.kernels import gate_up_silu as module

    x, weight = _operands(1000, 512, 1024, torch.bfloat16, seed=stages)
    tile = GateUpTile(128, 128, 64, 4, stages, 8, persistent=True, warp_specialize=True)
    if module._triton_version() < (3, 7):  # the GPU machine's 3.6: refused with a clear error, never run
        with pytest.raises(ValueError, match="Triton 3.7"):
            gate_up_silu(x, weight, tile, max_programs=7)
        return
    fused = gate_up_silu(x, weight, tile, max_programs=7)
    assert torch.isfinite(fused).all()
    torch.testing.assert_close(fused.float(), _unfused(x, weight).float(), rtol=2e-2, atol=2e-2)


def test_a_stacked_tile_refuses_a_strided_weight():
    x, weight = _operands(8, 32, 16, torch.bfloat16, seed=3)
    wide = torch.zeros(32, 40, dtype=weight.dtype, device=weight.device)
    wide[:, :32] = weight
    with pytest.raises(ValueError, match="contiguous weight"):
        gate_up_silu(x, wide[:, :32], GateUpTile(**{**SMALL.__dict__, "stacked": True}))


def test_a_warp_specialized_gate_up_tile_is_refused_before_triton_3_7(monkeypatch):
    from joule.kernels import gate_up_silu as module

    x, weight = _operands(8, 32, 16, torch.bfloat16, seed=4)
    monkeypatch.setattr(module, "_triton_version", lambda: (3, 6))
    with pytest.raises(ValueError, match="JOULE_FUSED_GATE_UP"):
        gate_up_silu(x, weight, GateUpTile(**{**SMALL.__dict__, "warp_specialize": True, "num_warps": 4}))


def test_the_triton_version_is_read_as_numbers(monkeypatch):
    from joule.kernels import gate_up_silu as module

    for text, expected in (("3.6.0", (3, 6)), ("3.10.1", (3, 10)), ("3.7.0+git1234", (3, 7)), ("4.0rc1", (4, 0))):
        monkeypatch.setattr(module.triton, "__version__", text)
        assert module._triton_version() == expected
