"""Decode row counts take the split-K GEMM only where it measured faster than cuBLAS (joule/runtime/linear_tuning.py),
and the projection then runs it at exactly those counts (Triton's interpreter on the CPU)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from helpers.scripted_timer import ScriptedTimer  # noqa: E402

from joule.model.layers import MergedLinear  # noqa: E402
from joule.runtime.linear_tuning import TUNING_ENV, decode_split_tiles, tune_decode_linears  # noqa: E402

TILES = decode_split_tiles()


def _projections(shapes) -> torch.nn.ModuleList:
    generator = torch.Generator().manual_seed(0)
    projections = []
    for out_features, in_features in shapes:
        linear = torch.nn.Linear(in_features, out_features, bias=False)
        linear.weight.data = torch.randn(out_features, in_features, generator=generator) / in_features**0.5
        projections.append(MergedLinear([linear], transpose_weight=False).to(torch.bfloat16))
    return torch.nn.ModuleList(projections)




def _row_count(cublas: float, *tile_times: float) -> list[float]:
    return [cublas, *tile_times] + [cublas + 1.0] * (len(TILES) - len(tile_times))


def test_a_tile_is_kept_only_where_it_beats_cublas_and_the_projection_runs_it(monkeypatch):
    monkeypatch.setenv(TUNING_ENV, "1")
    monkeypatch.setattr(MergedLinear, "fits_split_k", lambda self: True)
    model = _projections([(48, 256), (48, 256), (32, 256)])
    timer = ScriptedTimer(_row_count(10.0, 9.9)             # 64 rows: 1 % faster, inside the margin: cuBLAS stays
                          + _row_count(10.0, 11.0, 8.0)     # 128 rows: the second tile
                          + _row_count(10.0, 11.0, 11.0, 11.0, 12.0, 12.0, 12.0, 12.0)  # 256: every tile slower
                          + _row_count(10.0, 7.0) * 3)      # the other shape: the first tile everywhere
    chosen = tune_decode_linears(model, [1, 16, 32, 64, 128, 256, 1024], timer)
    assert chosen == 4 and timer.calls == 6 * (1 + len(TILES))  # 1-32 rows and 1024 never timed
    assert model[0].row_tiles == model[1].row_tiles == {128: TILES[1]}
    assert model[2].row_tiles == {64: TILES[0], 128: TILES[0], 256: TILES[0]}
    assert model[0].split_workspace is model[2].split_workspace is not None  # one workspace for the model

    hidden = torch.randn(128, 256).to(torch.bfloat16)
    import joule.kernels.split_k_linear as kernels

    calls = []
    original = kernels.split_k_linear
    monkeypatch.setattr(kernels, "split_k_linear", lambda *args: calls.append(args[2]) or original(*args))
    torch.testing.assert_close(model[0](hidden).float(), (hidden.float() @ model[0].weight.float().T),
                               rtol=1e-2, atol=2e-2)
    model[0](hidden[:64])  # a row count that stayed on cuBLAS
    assert calls == [TILES[1]]


def test_a_tile_giving_other_values_is_never_chosen(monkeypatch):
    import joule.kernels.split_k_linear as kernels

    monkeypatch.setenv(TUNING_ENV, "1")
    monkeypatch.setattr(MergedLinear, "fits_split_k", lambda self: True)
    original = kernels.split_k_linear

    def wrong_for_the_first(hidden, weight, tile, workspace=None):
        output = original(hidden, weight, tile, workspace)
        return output.fill_(float("nan")) if tile == TILES[0] else output

    monkeypatch.setattr(kernels, "split_k_linear", wrong_for_the_first)
    model = _projections([(48, 256)])
    timer = ScriptedTimer([10.0] + [5.0] * (len(TILES) - 1))  # the broken tile is not even timed
    assert tune_decode_linears(model, [64], timer) == 1
    assert model[0].row_tiles == {64: TILES[1]} and not timer.times


@pytest.mark.parametrize("setting", [None, "0"])
def test_it_is_off_unless_asked_for_and_cpu_weights_never_take_it(monkeypatch, setting):
    model = _projections([(48, 256)])
    if setting is None:
        monkeypatch.delenv(TUNING_ENV, raising=False)
    else:
        monkeypatch.setenv(TUNING_ENV, setting)
    monkeypatch.setattr(MergedLinear, "fits_split_k", lambda self: True)
    assert tune_decode_linears(model, [64, 128], ScriptedTimer([])) == 0 and model[0].row_tiles == {}
    monkeypatch.undo()
    monkeypatch.setenv(TUNING_ENV, "1")
    if not torch.cuda.is_available():
        assert not model[0].fits_split_k()
        assert tune_decode_linears(model, [64, 128], ScriptedTimer([])) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_the_gpu_a_four_split_tile_replays_in_a_graph_with_cublas_values(monkeypatch):
    """The decode graphs replay the split tiles: every replay leaves the arrival counters at zero for the next, and
    the sums stay cuBLAS's to 16-bit rounding."""
    monkeypatch.setenv(TUNING_ENV, "1")
    model = _projections([(3072, 2048), (2048, 8192)]).cuda()
    four_splits = TILES.index(next(tile for tile in TILES if tile.block_m == 128 and tile.splits == 4))
    script = [10.0] + [11.0] * len(TILES)
    script[1 + four_splits] = 5.0
    assert tune_decode_linears(model, [256], ScriptedTimer(script * 2)) == 2
    hidden = [torch.randn(256, 2048, device="cuda", dtype=torch.bfloat16),
              torch.randn(256, 8192, device="cuda", dtype=torch.bfloat16)]
    static = [tensor.clone() for tensor in hidden]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        [projection(tensor) for projection, tensor in zip(model, static)]  # warm-up (compiles) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = [projection(tensor) for projection, tensor in zip(model, static)]
    for scale in (1.0, -0.5):
        for source, target in zip(hidden, static):
            target.copy_(source * scale)
        graph.replay()
        torch.cuda.synchronize()
        for projection, tensor, output in zip(model, static, outputs):
            torch.testing.assert_close(output.float(), torch.nn.functional.linear(tensor, projection.weight).float(),
                                       rtol=2e-2, atol=2e-2)
    assert int(model[0].split_workspace.arrivals.abs().sum()) == 0
