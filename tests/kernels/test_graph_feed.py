"""The graph feed kernel: pinned host words copied by segment, the continued tokens laid over the first int64 ids."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.graph_feed import BLOCK, feed_graph_inputs  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def host_and_device(words: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    host = torch.randint(-2**31, 2**31 - 1, (words,), generator=generator, dtype=torch.int32)
    if DEVICE == "cuda":
        host = host.pin_memory()
    device = torch.full((words,), 7, dtype=torch.int32, device=DEVICE)
    return host, device


@pytest.mark.parametrize("segments", [
    [(0, 6), (40, 6), (80, 6), (120, 700)],      # a decode graph's ids, positions, slots, then lengths and tables
    [(3, 1)],                                    # one segment of one word
    [(0, BLOCK + 5), (2 * BLOCK, 2 * BLOCK + 1)],  # segments of several programs
])
def test_feed_copies_each_segment_and_leaves_the_rest(segments):
    words = 5 * BLOCK
    host, device = host_and_device(words, seed=len(segments))
    feed_graph_inputs(host, device, segments)
    expected = torch.full((words,), 7, dtype=torch.int32)
    for start, length in segments:
        expected[start : start + length] = host[start : start + length]
    assert torch.equal(device.cpu(), expected)


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_feed_lays_the_continued_tokens_over_the_first_ids(num_tokens):
    rows = 4  # int64 ids of 4 rows: words 0-7 of the buffer
    host, device = host_and_device(64, seed=num_tokens)
    tokens = torch.tensor([123456789012, 5, 2**40 + 3][:num_tokens], dtype=torch.int64, device=DEVICE)
    feed_graph_inputs(host, device, [(0, 2 * rows), (2 * rows, 20)], tokens)
    ids = device[: 2 * rows].view(torch.int64).cpu()
    assert ids[:num_tokens].tolist() == tokens.tolist()
    assert torch.equal(ids[num_tokens:], host[: 2 * rows].view(torch.int64)[num_tokens:])  # padding rows: the host's
    assert torch.equal(device[2 * rows : 2 * rows + 20].cpu(), host[2 * rows : 2 * rows + 20])


def test_feed_rejects_bad_arguments():
    host, device = host_and_device(16, seed=0)
    with pytest.raises(ValueError, match="int32"):
        feed_graph_inputs(host.to(torch.int64), device.to(torch.int64), [(0, 4)])
    with pytest.raises(ValueError, match="segments"):
        feed_graph_inputs(host, device, [(10, 8)])
    with pytest.raises(ValueError, match="segments"):
        feed_graph_inputs(host, device, [(0, 1)] * 5)
    with pytest.raises(ValueError, match="int64"):
        feed_graph_inputs(host, device, [(0, 4)], torch.ones(2, dtype=torch.int32, device=DEVICE))
