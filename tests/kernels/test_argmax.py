"""The two-pass argmax against torch.argmax: odd vocabularies, ties across and within chunks, bf16 rows."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.argmax import argmax_rows  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,vocab_size,chunk", [(1, 1000, 64), (3, 257, 16), (5, 4096, 1024), (2, 33, 64)])
def test_argmax_rows_matches_torch(dtype, rows, vocab_size, chunk):
    generator = torch.Generator().manual_seed(rows * vocab_size)
    logits = torch.randn(rows, vocab_size, generator=generator).to(DEVICE, dtype)
    assert torch.equal(argmax_rows(logits, chunk=chunk).cpu(), logits.argmax(dim=-1).cpu())


def test_ties_go_to_the_lowest_index_as_in_torch():
    logits = torch.zeros(4, 100)
    logits[0, [70, 10, 40]] = 5.0  # across chunks of 16
    logits[1, [20, 21]] = 5.0  # within one chunk
    logits[2] = 0.0  # all equal
    logits[3, 99] = float("inf")
    logits = logits.to(DEVICE, torch.bfloat16)
    result = argmax_rows(logits, chunk=16).cpu()
    assert result.tolist() == logits.argmax(dim=-1).cpu().tolist() == [10, 20, 0, 99]


def test_a_row_of_a_larger_tensor_and_bad_shapes():
    logits = torch.randn(3, 200).to(DEVICE)
    view = logits[:, :150]  # rows contiguous, row stride 200
    assert torch.equal(argmax_rows(view, chunk=32).cpu(), view.argmax(dim=-1).cpu())
    assert argmax_rows(torch.empty(0, 10, device=DEVICE)).shape == (0,)
    with pytest.raises(ValueError, match="contiguous rows"):
        argmax_rows(logits.t())
    with pytest.raises(ValueError, match="chunk"):
        argmax_rows(logits, chunk=24)
