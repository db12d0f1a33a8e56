"""The split-K GEMM against a float32 matmul rounded once, its arrival counters left at zero, its sum independent of
which program arrives last (Triton's interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.split_k_linear import SplitTile, SplitWorkspace, split_k_linear  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _operands(rows: int, in_features: int, out_features: int, dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator).to(DEVICE, dtype)
    weight = (torch.randn(out_features, in_features, generator=generator) / in_features**0.5).to(DEVICE, dtype)
    return x, weight


@pytest.mark.parametrize("rows,in_features,out_features", [(37, 64, 48), (64, 96, 32), (5, 32, 16), (16, 48, 40)])
@pytest.mark.parametrize("splits", [1, 2, 3])
def test_split_k_linear_matches_a_rounded_matmul(rows, in_features, out_features, splits):
    x, weight = _operands(rows, in_features, out_features, torch.bfloat16, seed=rows + splits)
    tile = SplitTile(block_m=16, block_n=16, block_k=16, splits=splits, num_warps=4, num_stages=2)
    if not tile.fits(in_features):
        with pytest.raises(ValueError, match="in_features"):
            split_k_linear(x, weight, tile, SplitWorkspace(x.device))
        return
    workspace = SplitWorkspace(x.device)
    output = split_k_linear(x, weight, tile, workspace)
    expected = x.float() @ weight.float().T
    assert output.shape == (rows, out_features) and output.dtype == torch.bfloat16
    assert expected.abs().max() > 0.5  # random operands, not zeros both sides would match
    torch.testing.assert_close(output.float(), expected, rtol=1e-2, atol=2e-2)
    if splits > 1:
        assert workspace.arrivals.numel() == tile.num_tiles(rows, out_features)
        assert int(workspace.arrivals.abs().sum()) == 0  # ready for the next launch (a CUDA graph replays it)
        again = split_k_linear(x, weight, tile, workspace)
        assert torch.equal(output, again)


def test_the_partials_are_added_in_split_order_whoever_arrives_last():
    """The last program adds every split's partial from the workspace in split order: summing the same float32
    partials in that order on the host gives the same bits."""
    x, weight = _operands(16, 64, 16, torch.float32, seed=3)
    tile = SplitTile(16, 16, 16, 4, 4, 2)
    workspace = SplitWorkspace(x.device)
    output = split_k_linear(x, weight, tile, workspace)
    partials = [x[:, part * 16:(part + 1) * 16] @ weight[:, part * 16:(part + 1) * 16].T for part in range(4)]
    in_order = ((partials[0] + partials[1]) + partials[2]) + partials[3]
    torch.testing.assert_close(output, in_order, rtol=1e-5, atol=1e-5)
    stored = workspace.partials[:4 * 256].view(4, 16, 16)
    assert torch.equal(output, ((stored[0] + stored[1]) + stored[2]) + stored[3])


def test_float16_and_an_empty_input():
    x, weight = _operands(20, 32, 24, torch.float16, seed=9)
    output = split_k_linear(x, weight, SplitTile(16, 16, 16, 2, 4, 2), SplitWorkspace(x.device))
    torch.testing.assert_close(output.float(), x.float() @ weight.float().T, rtol=1e-2, atol=1e-2)
    empty = split_k_linear(x[:0], weight, SplitTile(16, 16, 16, 2, 4, 2), SplitWorkspace(x.device))
    assert empty.shape == (0, 24)


@pytest.mark.parametrize("change,message", [
    ("dtype", "share a dtype"), ("shape", r"\[T, K\]"), ("workspace", "SplitWorkspace"), ("stride", "16 bytes"),
])
def test_bad_operands_are_named(change, message):
    x, weight = _operands(8, 32, 16, torch.bfloat16, seed=1)
    workspace = SplitWorkspace(x.device)
    if change == "dtype":
        weight = weight.half()
    elif change == "shape":
        weight = weight[:, :16]
    elif change == "workspace":
        workspace = None
    elif change == "stride":
        x = torch.zeros(8, 35, dtype=torch.bfloat16, device=DEVICE)[:, :32]
    with pytest.raises(ValueError, match=message):
        split_k_linear(x, weight, SplitTile(16, 16, 16, 2, 4, 2), workspace)


def test_the_workspace_grows_and_never_shrinks():
    workspace = SplitWorkspace(torch.device(DEVICE))
    workspace.reserve(100, 4)
    partials, arrivals = workspace.partials, workspace.arrivals
    workspace.reserve(50, 2)
    assert workspace.partials is partials and workspace.arrivals is arrivals
    workspace.reserve(200, 8)
    assert workspace.partials.numel() == 200 and int(workspace.arrivals.sum()) == 0
