"""Decode row counts choose the fused gate/up + SiLU GEMM only where it measured faster (joule/runtime/gate_up_tuning.py),
and the MLP then runs it at exactly those counts (Triton's interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from helpers.markers import interpreted_triton_on_cpu  # noqa: E402
from helpers.scripted_timer import ScriptedTimer  # noqa: E402

from joule.kernels.gate_up_config import FUSED_MIN_ROWS, GateUpTile  # noqa: E402
from joule.kernels.reference import silu_and_mul_reference  # noqa: E402
from joule.model.layers import GatedMLP, MergedLinear  # noqa: E402
from joule.runtime.gate_up_tuning import DECODE_TILES, TUNING_ENV, tune_decode_gate_up  # noqa: E402

SMALL = GateUpTile(16, 16, 16, 4, 2, 2, False)


def _mlps(monkeypatch, shapes) -> list[GatedMLP]:
    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "1")
    mlps = [GatedMLP(hidden, intermediate) for hidden, intermediate in shapes]
    for mlp in mlps:
        mlp.merge_projections(False)
        mlp.to(torch.bfloat16)
    return mlps


def _kernels_giving(monkeypatch, wrong_tiles=()) -> None:
    """The fused GEMM replaced by the unfused values (or NaNs for ``wrong_tiles``): the scripted timings decide."""
    import joule.kernels.gate_up_silu as kernels
    from joule.model.layers import swiglu

    def fake(hidden, weight, tile=None, max_programs=None):
        values = swiglu(torch.nn.functional.linear(hidden, weight))
        return torch.full_like(values, float("nan")) if tile in wrong_tiles else values

    monkeypatch.setattr(kernels, "gate_up_silu", fake)


def _row_count(cublas: float, *tile_times: float) -> list[float]:
    """One row count's script: cuBLAS + silu_and_mul, the given tiles, then every other tile of DECODE_TILES slower
    than cuBLAS (so adding a tile to the list keeps these scripts' meaning)."""
    return [cublas, *tile_times] + [cublas + 1.0] * (len(DECODE_TILES) - len(tile_times))


def test_a_tile_is_kept_only_where_it_beats_cublas_by_the_margin(monkeypatch):
    mlps = _mlps(monkeypatch, [(32, 48), (32, 48), (32, 24)])
    monkeypatch.setattr(MergedLinear, "fits_fused_gate_up", lambda self, hidden: True)
    _kernels_giving(monkeypatch)
    first_shape = (_row_count(10.0, 10.0, 9.9, 9.8)     # 64 rows: 2 % faster at best, inside the margin: cuBLAS stays
                   + _row_count(10.0, 9.5, 9.0, 9.6)    # 128 rows: the second tile
                   + _row_count(10.0, 8.0, 9.0, 9.0))   # 256 rows: the first
    other_shape = _row_count(10.0, 11.0, 12.0, 10.5) * 3  # every tile slower
    timer = ScriptedTimer(first_shape + other_shape)
    chosen = tune_decode_gate_up(torch.nn.ModuleList(mlps), [1, 2, 32, 64, 128, 256, FUSED_MIN_ROWS], timer)
    assert chosen == 2 and timer.calls == 6 * (1 + len(DECODE_TILES))  # 1-32 rows and FUSED_MIN_ROWS never timed
    assert mlps[0].row_tiles == mlps[1].row_tiles == {128: DECODE_TILES[1], 256: DECODE_TILES[0]}
    assert mlps[2].row_tiles == {}
    assert mlps[0].tile_for(128) == DECODE_TILES[1] and mlps[0].tile_for(64) is None
    assert mlps[0].tile_for(FUSED_MIN_ROWS) == mlps[0].fused_tile  # long steps keep their own tile
    assert mlps[2].tile_for(256) is None


def test_a_tile_that_fails_to_compile_is_skipped_not_fatal(monkeypatch):
    mlps = _mlps(monkeypatch, [(32, 48)])
    monkeypatch.setattr(MergedLinear, "fits_fused_gate_up", lambda self, hidden: True)
    _kernels_giving(monkeypatch)
    times = iter(_row_count(10.0, None, 8.0, 9.5))  # cuBLAS, then the first tile fails, the second wins

    def timer(run) -> float:
        value = next(times)
        if value is None:
            raise RuntimeError("out of shared memory")
        return value

    assert tune_decode_gate_up(torch.nn.ModuleList(mlps), [64], timer) == 1
    assert mlps[0].row_tiles == {64: DECODE_TILES[1]}


def test_a_tile_with_wrong_values_is_never_chosen_however_fast(monkeypatch):
    mlps = _mlps(monkeypatch, [(32, 48)])
    monkeypatch.setattr(MergedLinear, "fits_fused_gate_up", lambda self, hidden: True)
    _kernels_giving(monkeypatch, wrong_tiles=(DECODE_TILES[0],))
    # cuBLAS, then the right tiles: the wrong one is not even timed
    timer = ScriptedTimer(_row_count(10.0, 9.0, 9.5)[:-1])
    assert tune_decode_gate_up(torch.nn.ModuleList(mlps), [64], timer) == 1
    assert mlps[0].row_tiles == {64: DECODE_TILES[1]} and timer.calls == len(DECODE_TILES)


def test_outputs_match_only_when_finite_and_close():
    from joule.runtime.gate_up_tuning import output_matches

    reference = torch.randn(8, 16, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    assert output_matches(reference.clone(), reference)
    assert output_matches((reference.float() * 1.001).to(torch.bfloat16), reference)
    broken = reference.clone()
    broken[3, 4] = float("nan")
    assert not output_matches(broken, reference)
    assert not output_matches(reference + 1.0, reference) and not output_matches(reference[:4], reference)


def test_no_tuning_when_switched_off_or_where_the_kernel_cannot_run(monkeypatch):
    mlps = _mlps(monkeypatch, [(32, 48)])
    timer = ScriptedTimer([])
    assert tune_decode_gate_up(torch.nn.ModuleList(mlps), [64, 128], timer) == 0  # CPU tensors: it never fits
    monkeypatch.setattr(MergedLinear, "fits_fused_gate_up", lambda self, hidden: True)
    monkeypatch.setenv(TUNING_ENV, "0")
    assert tune_decode_gate_up(torch.nn.ModuleList(mlps), [64, 128], timer) == 0
    assert timer.calls == 0 and mlps[0].row_tiles == {}
    monkeypatch.setenv("JOULE_FUSED_GATE_UP", "0")  # the fused GEMM off altogether: no MLP is tuned or chooses it
    plain = GatedMLP(32, 48)
    plain.merge_projections(False)
    plain.row_tiles = {64: SMALL}
    assert plain.tile_for(64) is None and plain.tile_for(FUSED_MIN_ROWS) is None


@interpreted_triton_on_cpu
def test_the_mlp_runs_the_chosen_tile_at_that_row_count_only(monkeypatch):
    mlp = _mlps(monkeypatch, [(32, 48)])[0]
    generator = torch.Generator().manual_seed(4)
    for parameter in mlp.parameters():
        parameter.data = (torch.randn(parameter.shape, generator=generator) * 0.2).to(torch.bfloat16)
    monkeypatch.setattr(MergedLinear, "fits_fused_gate_up", lambda self, hidden: True)
    launched = []
    import joule.kernels.gate_up_silu as kernels

    original = kernels.gate_up_silu
    monkeypatch.setattr(kernels, "gate_up_silu",
                        lambda hidden, weight, tile=None, max_programs=None:
                        launched.append((hidden.shape[0], tile)) or original(hidden, weight, tile, max_programs))
    hidden = torch.randn(40, 32, generator=generator).to(torch.bfloat16)
    mlp(hidden[:32])
    assert launched == []  # no row tile chosen yet: cuBLAS's path (here the CPU's)
    mlp.row_tiles = {32: SMALL}
    activations = []
    mlp.down_proj.register_forward_pre_hook(lambda module, inputs: activations.append(inputs[0]))
    mlp(hidden[:32])
    assert launched == [(32, SMALL)]
    # What the down projection got against the GPU's unfused rounding: the projection in bf16, SiLU-and-mul in
    # float32, rounded once.
    expected = silu_and_mul_reference(mlp.gate_up_proj(hidden[:32])).float()
    assert expected.abs().max() > 0.05  # random weights and inputs: a zero result would match anything
    torch.testing.assert_close(activations[0].float(), expected, rtol=2e-2, atol=2e-2)
    mlp(hidden[:31])
    assert len(launched) == 1  # another row count keeps the unfused path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tuning_on_the_gpu_keeps_outputs_within_bf16_of_the_unfused_mlp(monkeypatch):
    from joule.kernels.common import device_capability

    if device_capability(torch.device("cuda")) < (9, 0):
        pytest.skip("the fused GEMM needs sm_90 (tensor-memory descriptors)")
    mlp = _mlps(monkeypatch, [(2048, 8192)])[0].cuda()  # Llama-3.2-1B's MLP
    for parameter in mlp.parameters():
        parameter.data.normal_(0.0, 0.02)
    tune_decode_gate_up(torch.nn.ModuleList([mlp]), [64, 128, 256])
    assert set(mlp.row_tiles) <= {64, 128, 256} and set(mlp.row_tiles.values()) <= set(DECODE_TILES)
    hidden = torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16)
    tuned = mlp(hidden).float()
    mlp.row_tiles = {}
    torch.testing.assert_close(tuned, mlp(hidden).float(), rtol=2e-2, atol=2e-2)
