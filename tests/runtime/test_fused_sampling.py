"""The sampler's fused mode (``Sampler(fused=True)``; on a GPU by default, ``JOULE_FUSED_SAMPLING=0`` off) under Triton's interpreter:
greedy rows stay the argmax, a seeded row draws the same token whatever else is in the batch (the kernel's steps and
the filtered steps' torch race share its Philox noise), filters still filter, and the default mode is untouched."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported

pytest.importorskip("triton", reason="triton is not installed: the fused sampling kernel cannot run")

from joule.runtime.fused_sampling import FUSED_SAMPLING_ENV, FusedSampling  # noqa: E402
from joule.runtime.sampler import Sampler, SamplingRow  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def logits_of(rows: int, vocab: int = 300, seed: int = 0) -> torch.Tensor:
    return (2 * torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


def test_a_seeded_row_draws_the_same_token_in_any_batch_and_either_path():
    sampler = Sampler(0, DEVICE, fused=True)
    base = logits_of(3)
    seeded = SamplingRow(temperature=0.8, seed=1234, output_token_ids=[5, 6])
    alone = sampler.sample_on_device(base[:1].contiguous(), [seeded]).item()
    # Beside a greedy row and an unseeded one: the kernel's path.
    mixed = sampler.sample_on_device(base, [seeded, SamplingRow(temperature=0.0), SamplingRow(temperature=1.3)])
    assert mixed[0].item() == alone and mixed[1].item() == base[1].argmax().item()
    # Beside a top-p row: the torch race with the same Philox uniforms.
    filtered = sampler.sample_on_device(base, [seeded, SamplingRow(temperature=0.7, top_p=0.5),
                                               SamplingRow(temperature=0.0)])
    assert filtered[0].item() == alone and filtered[2].item() == base[2].argmax().item()
    # The host path (logprobs) samples it alike.
    hosted = sampler.sample(base[:1].contiguous(), [SamplingRow(temperature=0.8, seed=1234, output_token_ids=[5, 6],
                                                                num_logprobs=1)])
    assert hosted.token_ids == [alone] and hosted.logprobs[0].token_id == alone
    # The next generation step draws other noise: over steps, a seeded row does not repeat one token.
    steps = {sampler.sample_on_device(base[:1].contiguous(), [SamplingRow(temperature=5.0, seed=1234,
                                                                          output_token_ids=[0] * n)]).item()
             for n in range(12)}
    assert len(steps) > 3


def test_filters_still_filter_in_the_fused_mode():
    sampler = Sampler(0, DEVICE, fused=True)
    logits = logits_of(1, vocab=64, seed=1)
    top_two = set(torch.topk(logits[0], 2).indices.tolist())
    drawn = {sampler.sample_on_device(logits, [SamplingRow(temperature=3.0, top_k=2, seed=seed)]).item()
             for seed in range(40)}
    assert drawn <= top_two and len(drawn) == 2


def test_unseeded_rows_are_reproducible_for_a_sampler_seed():
    logits = logits_of(4, seed=2)
    rows = [SamplingRow(temperature=1.5)] * 4
    first = [Sampler(7, DEVICE, fused=True).sample_on_device(logits, rows).tolist() for _ in range(2)]
    other = Sampler(8, DEVICE, fused=True).sample_on_device(logits, rows).tolist()
    assert first[0] == first[1] and other != first[0]


def test_the_mode_is_on_with_cuda_unless_the_environment_turns_it_off(monkeypatch):
    monkeypatch.delenv(FUSED_SAMPLING_ENV, raising=False)
    assert FusedSampling(0, None).applies(torch.device("cuda"))
    assert not FusedSampling(0, None).applies(torch.device("cpu"))
    for off in ("0", "off", "false"):
        monkeypatch.setenv(FUSED_SAMPLING_ENV, off)
        assert not FusedSampling(0, None).applies(torch.device("cuda"))
    monkeypatch.setenv(FUSED_SAMPLING_ENV, "1")
    assert FusedSampling(0, None).applies(torch.device("cuda"))
    assert not FusedSampling(0, False).applies(torch.device("cuda")) and FusedSampling(0, True).applies(DEVICE)
    # The default mode's tokens are the torch race's, as before.
    logits = logits_of(2, seed=3)
    rows = [SamplingRow(temperature=0.9, seed=42), SamplingRow(temperature=0.0)]
    assert Sampler(0, DEVICE).sample_on_device(logits, rows).tolist() == Sampler(0, DEVICE, fused=False).sample(
        logits, rows).token_ids
