"""The fused temperature race against its torch reference with the same uniforms, its greedy rows against argmax,
its draws against the softmax they sample, and a seeded row's token independent of the batch around it."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

pytest.importorskip("triton", reason="triton is not installed: the Triton kernels cannot be tested")

from joule.kernels.sample_rows import (  # noqa: E402
    draw_uniforms,
    reference_sample_rows,
    sample_rows,
    signed_seeds,
)
from joule.runtime.sampler import mix_seed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def row_arguments(seeds: list[int], temperatures: list[float]):
    """The kernel's per-row tensors: greedy rows (temperature 0) with the noise off and 1/T = 1."""
    inverse = [1.0 if temperature == 0 else 1.0 / temperature for temperature in temperatures]
    return (torch.tensor(signed_seeds(seeds), dtype=torch.int64, device=DEVICE),
            torch.tensor(inverse, dtype=torch.float32, device=DEVICE),
            torch.tensor([int(temperature != 0) for temperature in temperatures], dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab_size,chunk", [(1000, 64), (257, 16), (33, 64)])
def test_the_kernel_is_the_reference_race_on_its_own_uniforms(dtype, vocab_size, chunk):
    generator = torch.Generator().manual_seed(vocab_size)
    logits = (3 * torch.randn(5, vocab_size, generator=generator)).to(DEVICE, dtype)
    seeds = [mix_seed(7, step) for step in range(4)] + [2**64 - 1]  # the last one's high bit set
    arguments = row_arguments(seeds, [0.8, 1.0, 0.0, 2.5, 0.3])
    tokens = sample_rows(logits, *arguments, chunk=chunk)
    expected = reference_sample_rows(logits, draw_uniforms(arguments[0], vocab_size), *arguments[1:])
    assert torch.equal(tokens.cpu(), expected.cpu())
    assert tokens[2].item() == logits[2].float().argmax().item()  # the greedy row


def test_greedy_rows_are_the_argmax_with_ties_to_the_lowest_index():
    logits = torch.zeros(3, 100)
    logits[0, [70, 10, 40]] = 5.0
    logits[1, [20, 21]] = 5.0
    logits = logits.to(DEVICE)
    tokens = sample_rows(logits, *row_arguments([1, 2, 3], [0.0, 0.0, 0.0]), chunk=16)
    assert tokens.cpu().tolist() == [10, 20, 0]


def test_draws_follow_the_softmax_at_the_temperature():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5, -3.0, 1.5, 0.2]], device=DEVICE)
    temperature, draws = 0.7, 1200
    expected = torch.softmax(logits[0].cpu() / temperature, dim=-1)
    seeds = [mix_seed(11, step) for step in range(draws)]
    tokens = sample_rows(logits.expand(draws, -1).contiguous(), *row_arguments(seeds, [temperature] * draws), chunk=16)
    frequencies = torch.bincount(tokens.cpu(), minlength=8).float() / draws
    assert torch.allclose(frequencies, expected, atol=0.045), (frequencies, expected)  # ~3 standard deviations


def test_a_seeded_row_draws_the_same_token_wherever_it_sits():
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=generator).to(DEVICE)
    seeds, temperatures = [mix_seed(5, 0), 17, 99, mix_seed(5, 1)], [1.0, 0.9, 0.0, 1.2]
    alone = [sample_rows(logits[i : i + 1].contiguous(), *row_arguments([seeds[i]], [temperatures[i]]), chunk=64).item()
             for i in range(4)]
    order = [3, 1, 0, 2]
    shuffled = sample_rows(logits[order].contiguous(), *row_arguments([seeds[i] for i in order],
                                                                      [temperatures[i] for i in order]), chunk=64)
    assert shuffled.cpu().tolist() == [alone[i] for i in order]
    again = sample_rows(logits, *row_arguments(seeds, temperatures), chunk=64)
    assert again.cpu().tolist() == alone


def test_bad_arguments_name_what_is_wrong():
    logits = torch.randn(2, 50, device=DEVICE)
    seeds, inverse, noise = row_arguments([1, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="seeds must be"):
        sample_rows(logits, seeds[:1], inverse, noise)
    with pytest.raises(ValueError, match="inverse_temperatures must be"):
        sample_rows(logits, seeds, inverse.double(), noise)
    with pytest.raises(ValueError, match="noise_on must be"):
        sample_rows(logits, seeds, inverse, noise.long())
    with pytest.raises(ValueError, match="contiguous rows"):
        sample_rows(logits.t(), seeds, inverse, noise)
    with pytest.raises(ValueError, match="chunk must be"):
        sample_rows(logits, seeds, inverse, noise, chunk=24)
    assert sample_rows(logits[:0], seeds[:0], inverse[:0], noise[:0]).shape == (0,)
    assert signed_seeds([0, 2**63 - 1, 2**63, 2**64 - 1]) == [0, 2**63 - 1, -(2**63), -1]
