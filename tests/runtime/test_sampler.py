"""Tests for the batched sampler: processing order, filters, seeding and logprobs."""

from __future__ import annotations

import math
import random
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from joule.runtime import logit_processors
from joule.runtime.sampler import (
    Sampler,
    SamplingRow,
    apply_bans_and_penalties,
    filter_cutoffs,
    mix_seed,
)


_HAS_CUDA = torch.cuda.is_available()


_NEEDS_CUDA = pytest.mark.skipif(not _HAS_CUDA, reason="needs CUDA")


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=_NEEDS_CUDA)])
def device(request) -> torch.device:
    return torch.device(request.param)


def _random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0, device="cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * scale).to(device)


def _draw(logits_row: torch.Tensor, count: int, first_seed: int = 0, **params) -> list[int]:
    """Sample ``count`` times from one row of logits with distinct seeds, in one batch."""
    logits = logits_row.unsqueeze(0).expand(count, -1).contiguous()
    rows = [SamplingRow(seed=first_seed + i, **params) for i in range(count)]
    return Sampler().sample(logits, rows).token_ids


def _chi_square(samples: list[int], expected_probs: torch.Tensor) -> float:
    counts = torch.bincount(torch.tensor(samples), minlength=expected_probs.numel()).double()
    expected = expected_probs.double() * len(samples)
    support = expected > 0
    assert counts[~support].sum() == 0, "sampled a token with zero expected probability"
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


# Critical values of chi-square at p = 0.001: the seeds are fixed, so this is a
# deterministic check with a tolerance wide enough for any honest sampler.
_CHI2_CRITICAL = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 7: 24.32}


# ---------------------------------------------------------------- greedy & bans


def test_greedy_equals_argmax(device):
    logits = _random_logits(16, 300, device=device)
    rows = [SamplingRow(temperature=0.0) for _ in range(16)]
    output = Sampler().sample(logits, rows)
    assert output.token_ids == logits.argmax(dim=-1).tolist()
    assert output.logprobs == [None] * 16


def test_bfloat16_logits_sample_as_their_float32_widening(device):
    """The model hands over logits in its own dtype: greedy rows take their argmax as is, sampled rows
    and logprobs widen first, so every result equals the float32 one (ties included)."""
    logits = _random_logits(12, 500, seed=3, device=device).to(torch.bfloat16)  # bf16 rounding makes ties
    widened = logits.float()
    rows = [SamplingRow(temperature=0.0) for _ in range(4)]
    rows += [SamplingRow(temperature=0.0, num_logprobs=3) for _ in range(2)]
    rows += [SamplingRow(temperature=0.8, top_k=20, seed=index) for index in range(3)]
    rows += [SamplingRow(temperature=0.0, repetition_penalty=1.3, output_token_ids=[1, 2]) for _ in range(3)]
    low, wide = Sampler().sample(logits, rows), Sampler().sample(widened, rows)
    assert low.token_ids == wide.token_ids
    assert low.logprobs == wide.logprobs
    greedy_only = Sampler().sample(logits[:4], rows[:4]).token_ids
    assert greedy_only == widened[:4].argmax(dim=-1).tolist()


def test_tiny_temperature_is_greedy():
    logits = _random_logits(8, 100, seed=1)
    rows = [SamplingRow(temperature=1e-6, seed=i) for i in range(8)]
    assert Sampler().sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_banned_tokens_never_chosen(device):
    logits = _random_logits(4, 50, seed=2, device=device)
    best = logits.argmax(dim=-1).tolist()
    rows = [SamplingRow(temperature=0.0, banned_token_ids=[best[i]]) for i in range(4)]
    chosen = Sampler().sample(logits, rows).token_ids
    second = logits.topk(2, dim=-1).indices[:, 1].tolist()
    assert chosen == second

    banned = [0, 1, 2, 3, 4]
    flat = torch.zeros(10, device=device)
    tokens = _draw(flat, 2000, temperature=2.0, banned_token_ids=banned)
    assert not set(tokens) & set(banned)
    assert set(tokens) == {5, 6, 7, 8, 9}


def test_out_of_range_banned_ids_are_ignored(device):
    # A stop id the model cannot produce needs no ban; it must not hit a neighbouring row.
    logits = torch.tensor([[0.0, 1.0, 5.0], [9.0, 0.0, 0.0]], device=device)
    rows = [SamplingRow(temperature=0.0, banned_token_ids=[3, 2, -1]), SamplingRow(temperature=0.0)]
    assert Sampler().sample(logits, rows).token_ids == [1, 0]
    rows = [SamplingRow(temperature=0.0, banned_token_ids=[3]), SamplingRow(temperature=0.0)]
    assert Sampler().sample(logits, rows).token_ids == [2, 0]


def test_empty_batch():
    output = Sampler().sample(torch.zeros(0, 10), [])
    assert output.token_ids == [] and output.logprobs == []


def test_invalid_inputs_raise_value_error():
    sampler = Sampler()
    with pytest.raises(ValueError, match="2 sampling rows for 3"):
        sampler.sample(torch.zeros(3, 10), [SamplingRow(temperature=0.0)] * 2)
    with pytest.raises(ValueError, match="vocab_size"):
        sampler.sample(torch.zeros(10), [SamplingRow(temperature=0.0)])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        sampler.sample(
            torch.zeros(1, 10), [SamplingRow(temperature=0.0, presence_penalty=1.0, output_token_ids=[-1])]
        )


def test_caller_logits_not_modified(device):
    logits = _random_logits(3, 40, seed=3, device=device)
    original = logits.clone()
    rows = [
        SamplingRow(temperature=0.7, top_p=0.5, min_p=0.1, seed=1, banned_token_ids=[1], num_logprobs=2),
        SamplingRow(temperature=0.0, repetition_penalty=1.5, output_token_ids=[2, 3]),
        SamplingRow(temperature=1.0, top_k=5, frequency_penalty=1.0, output_token_ids=[4]),
    ]
    Sampler().sample(logits, rows)
    assert torch.equal(logits, original)


# ---------------------------------------------------------------- penalties


_PENALTY_LOGITS = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
_PROMPT, _OUTPUT = [0, 1], [1, 3, 3]


def _penalized(**params) -> list[float]:
    row = SamplingRow(temperature=0.0, prompt_token_ids=_PROMPT, output_token_ids=_OUTPUT, **params)
    return apply_bans_and_penalties(_PENALTY_LOGITS, [row])[0].tolist()


def test_repetition_penalty_hand_computed():
    # Seen in prompt or output: 0, 1, 3. Positive logits divided, negative multiplied.
    assert _penalized(repetition_penalty=2.0) == pytest.approx([1.0, -2.0, 0.5, 1.5, -2.0])


def test_frequency_and_presence_penalties_hand_computed():
    # Output counts: token 1 once, token 3 twice; prompt tokens are not counted.
    assert _penalized(frequency_penalty=0.5) == pytest.approx([2.0, -1.5, 0.5, 2.0, -2.0])
    assert _penalized(presence_penalty=0.25) == pytest.approx([2.0, -1.25, 0.5, 2.75, -2.0])
    assert _penalized(frequency_penalty=-0.5, presence_penalty=-0.25) == pytest.approx(
        [2.0, -0.25, 0.5, 4.25, -2.0]
    )


def test_penalties_apply_repetition_first():
    combined = _penalized(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    assert combined == pytest.approx([1.0, -2.75, 0.5, 0.25, -2.0])


def test_penalties_only_touch_their_row_and_change_greedy_choice(device):
    logits = _PENALTY_LOGITS.repeat(3, 1).to(device)
    rows = [
        SamplingRow(temperature=0.0, output_token_ids=_OUTPUT),
        SamplingRow(temperature=0.0, output_token_ids=_OUTPUT, frequency_penalty=0.8),
        SamplingRow(temperature=0.0, prompt_token_ids=[3], repetition_penalty=4.0),
    ]
    processed = apply_bans_and_penalties(logits, rows)
    assert torch.equal(processed[0], logits[0])
    assert processed[1].tolist() == pytest.approx([2.0, -1.8, 0.5, 1.4, -2.0])
    assert processed[2].tolist() == pytest.approx([2.0, -1.0, 0.5, 0.75, -2.0])
    assert Sampler().sample(logits, rows).token_ids == [3, 0, 0]


def test_histories_accept_lists_arrays_and_tensors():
    logits = _random_logits(2, 30, seed=14)
    params = dict(temperature=0.0, repetition_penalty=1.7, frequency_penalty=0.3, presence_penalty=0.1)
    as_lists = [SamplingRow(prompt_token_ids=[1, 2, 2], output_token_ids=[5, 5, 29], **params)] * 2
    as_arrays = [
        SamplingRow(prompt_token_ids=np.array([1, 2, 2]), output_token_ids=torch.tensor([5, 5, 29]), **params),
        SamplingRow(prompt_token_ids=(1, 2, 2), output_token_ids=np.array([5, 5, 29], np.int32), **params),
    ]
    expected = apply_bans_and_penalties(logits, as_lists)
    assert torch.equal(apply_bans_and_penalties(logits, as_arrays), expected)


def test_bans_survive_penalties():
    logits = torch.tensor([[1.0, -5.0, 0.0]])
    row = SamplingRow(temperature=0.0, banned_token_ids=[0], output_token_ids=[0, 0], frequency_penalty=-2.0)
    assert apply_bans_and_penalties(logits, [row])[0, 0] == -math.inf
    assert Sampler().sample(logits, [row]).token_ids == [2]


# ---------------------------------------------------------------- filters


_FOUR = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()


def test_logit_bias_is_added_before_penalties_and_bans_win(device):
    logits = _random_logits(3, 40, seed=5, device=device)
    best = logits.argmax(dim=-1).tolist()
    rows = [
        SamplingRow(temperature=0.0, logit_bias={7: 100.0}),
        SamplingRow(temperature=0.0, logit_bias={best[1]: -100.0}),
        SamplingRow(temperature=0.0, logit_bias={9: 100.0}, banned_token_ids=[9]),
    ]
    processed = apply_bans_and_penalties(logits, rows)
    assert processed[0, 7].item() == pytest.approx(logits[0, 7].item() + 100.0)
    assert processed[1, best[1]].item() == pytest.approx(logits[1, best[1]].item() - 100.0)
    assert torch.equal(processed[0, :7], logits[0, :7].float()), "only the biased token moves"
    tokens = Sampler().sample(logits, rows).token_ids
    second_best = logits[1].topk(2).indices[1].item()
    assert tokens == [7, second_best, best[2]]
    seeded = [SamplingRow(temperature=1.0, seed=1, logit_bias={3: 100.0})]
    assert Sampler().sample(logits[:1], seeded).token_ids == [3]


def test_top_k_one_equals_greedy():
    logits = _random_logits(32, 300, seed=4)
    rows = [SamplingRow(temperature=1.5, top_k=1, seed=i) for i in range(32)]
    assert Sampler().sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_top_p_keeps_only_the_argmax():
    logits = _random_logits(32, 2000, seed=5, scale=0.2)  # flat: nucleus would be wide
    rows = [SamplingRow(temperature=1.0, top_p=1e-6, seed=i) for i in range(32)]
    assert Sampler().sample(logits, rows).token_ids == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize(
    ("params", "support"),
    [
        ({"top_p": 0.75}, {0, 1}),
        ({"top_p": 0.85}, {0, 1, 2}),
        ({"top_k": 2}, {0, 1}),
        ({"min_p": 0.2}, {0, 1, 2}),  # drops p < 0.1
        ({"min_p": 0.7}, {0}),
        ({"top_k": 3, "top_p": 0.6}, {0, 1}),  # 0.5 / 0.95 < 0.6 <= 0.8 / 0.95
    ],
)
def test_filters_keep_expected_support(params, support, device):
    tokens = _draw(_FOUR.to(device), 3000, temperature=1.0, **params)
    assert set(tokens) == support


def test_top_p_renormalises_after_top_k(device):
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1], device=device).log()
    assert set(_draw(logits, 2000, temperature=1.0, top_p=0.75)) == {0, 1, 2}
    # Within the top 3, 0.4/0.9 + 0.3/0.9 = 0.78 >= 0.75.
    assert set(_draw(logits, 2000, temperature=1.0, top_p=0.75, top_k=3)) == {0, 1}


def test_temperature_sampling_follows_softmax(device):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    temperature = 0.8
    tokens = _draw(logits.to(device), 8000, temperature=temperature)
    assert _chi_square(tokens, torch.softmax(logits / temperature, dim=-1)) < _CHI2_CRITICAL[5]


def test_filtered_sampling_follows_renormalised_softmax():
    logits = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -2.0])
    tokens = _draw(logits, 6000, temperature=1.0, top_k=4, first_seed=10_000)
    expected = torch.softmax(logits, dim=-1)
    expected[4:] = 0
    assert _chi_square(tokens, expected / expected.sum()) < _CHI2_CRITICAL[3]


def test_unseeded_sampling_follows_softmax(device):
    logits = torch.tensor([1.0, 0.0, -0.5, 0.5, 2.0, -2.0])
    batch = logits.unsqueeze(0).expand(6000, -1).contiguous().to(device)
    tokens = Sampler(seed=11).sample(batch, [SamplingRow(temperature=1.3)] * 6000).token_ids
    assert _chi_square(tokens, torch.softmax(logits / 1.3, dim=-1)) < _CHI2_CRITICAL[5]


def test_cpu_top_p_candidates_match_full_sort(monkeypatch):
    # Nuclei of every size: found among 512 candidates, among 4096, or only by a full sort.
    scaled = torch.cat([_random_logits(4, 8192, seed=6, scale=scale) for scale in (6.0, 1.5, 0.3)])
    settings_ = [(0.9, -1), (0.5, 100), (0.99, 0), (0.7, 1000)] * 3
    rows = [SamplingRow(temperature=1.0, top_p=p, top_k=k) for p, k in settings_]
    with_candidates = filter_cutoffs(scaled, rows)
    monkeypatch.setattr(logit_processors, "_CPU_TOP_P_CANDIDATE_WIDTHS", ())
    full_sort = filter_cutoffs(scaled, rows)
    assert torch.equal(with_candidates, full_sort)
    kept = (scaled >= full_sort.unsqueeze(1)).sum(dim=-1).tolist()
    assert min(kept) < 512 and any(512 < n < 4096 for n in kept) and max(kept) > 4096


def _reference_support(logits: torch.Tensor, row: SamplingRow, slack: float = 1e-4) -> set[int]:
    """Tokens a correct sampler may pick, computed in float64 with slack at the boundaries."""
    scaled = logits.double() / row.temperature
    probs = torch.softmax(scaled, dim=-1)
    keep = probs >= row.min_p * probs.max() * (1 - slack)
    if 0 < row.top_k < logits.numel():
        keep &= scaled >= scaled.topk(row.top_k).values[-1] - slack
    renormalised = torch.where(keep, probs, 0.0)
    renormalised /= renormalised.sum()
    order = renormalised.argsort(descending=True)
    before = torch.cumsum(renormalised[order], 0) - renormalised[order]
    nucleus = torch.zeros_like(keep)
    nucleus[order] = before < row.top_p + slack
    return set((keep & nucleus).nonzero().flatten().tolist())


@settings(max_examples=60, deadline=None)
@given(
    vocab=st.integers(2, 40),
    data_seed=st.integers(0, 10_000),
    scale=st.sampled_from([0.1, 1.0, 5.0]),
    temperature=st.floats(0.2, 2.0),
    top_k=st.integers(-1, 10),
    top_p=st.floats(0.05, 1.0),
    min_p=st.sampled_from([0.0, 0.05, 0.3]),
)
def test_sampled_token_within_reference_support(vocab, data_seed, scale, temperature, top_k, top_p, min_p):
    logits = _random_logits(1, vocab, seed=data_seed, scale=scale)[0]
    params = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    support = _reference_support(logits, SamplingRow(**params))
    assert set(_draw(logits, 64, first_seed=data_seed, **params)) <= support


# ---------------------------------------------------------------- reproducibility


def _target_rows() -> list[SamplingRow]:
    common = dict(prompt_token_ids=[1, 2, 3], output_token_ids=[4, 5, 5, 6])
    return [
        SamplingRow(temperature=0.9, seed=42, **common),
        SamplingRow(temperature=1.2, top_p=0.97, seed=43, **common),  # wide nucleus: sort fallback
        SamplingRow(temperature=0.7, top_k=50, top_p=0.8, seed=44, **common),
        SamplingRow(temperature=1.0, min_p=0.05, repetition_penalty=1.3, seed=45, **common),
        SamplingRow(temperature=1.1, top_k=7, frequency_penalty=0.4, presence_penalty=0.2, seed=-3, **common),
    ]


def _neighbour(index: int) -> SamplingRow:
    kinds = [
        SamplingRow(temperature=0.0),
        SamplingRow(temperature=1.0),
        SamplingRow(temperature=0.5, top_p=0.3, seed=index),
        SamplingRow(temperature=1.0, top_k=1000, min_p=0.01, repetition_penalty=1.2, output_token_ids=[index]),
        SamplingRow(temperature=2.0, top_p=0.999, banned_token_ids=[0, 1, 2], num_logprobs=3),
    ]
    return kinds[index % len(kinds)]


def test_seeded_rows_independent_of_batch_composition(device):
    vocab = 3000
    targets = _target_rows()
    target_logits = _random_logits(len(targets), vocab, seed=8, scale=1.0, device=device)
    solo = [
        Sampler(seed=0).sample(target_logits[i : i + 1], [row]).token_ids[0]
        for i, row in enumerate(targets)
    ]
    for trial, batch_size in enumerate([2, 7, 19]):
        for target_index, target in enumerate(targets):
            position = (trial * 5 + target_index) % batch_size
            logits = _random_logits(batch_size, vocab, seed=100 + trial, scale=2.0, device=device)
            logits[position] = target_logits[target_index]
            rows = [_neighbour(i + trial) for i in range(batch_size)]
            rows[position] = target
            chosen = Sampler(seed=trial + 1).sample(logits, rows).token_ids[position]
            assert chosen == solo[target_index], (trial, target_index)


def test_many_seeded_rows_match_solo_runs_when_shuffled(device):
    chooser = random.Random(0)
    vocab = 5000
    logits = _random_logits(48, vocab, seed=13, scale=1.5, device=device)
    rows = [
        SamplingRow(
            temperature=chooser.choice([0.0, 0.5, 1.0, 1.7]),
            top_p=chooser.choice([1.0, 0.3, 0.9, 0.995]),
            top_k=chooser.choice([-1, 0, 1, 40, 2000]),
            min_p=chooser.choice([0.0, 0.0, 0.1]),
            repetition_penalty=chooser.choice([1.0, 1.3]),
            frequency_penalty=chooser.choice([0.0, 0.5]),
            presence_penalty=chooser.choice([0.0, -0.4]),
            seed=chooser.randrange(1 << 40),
            prompt_token_ids=[chooser.randrange(vocab) for _ in range(30)],
            output_token_ids=[chooser.randrange(vocab) for _ in range(chooser.randrange(20))],
        )
        for _ in range(48)
    ]
    solo = [Sampler().sample(logits[i : i + 1], [row]).token_ids[0] for i, row in enumerate(rows)]
    assert Sampler().sample(logits, rows).token_ids == solo
    order = list(range(48))
    chooser.shuffle(order)
    shuffled = Sampler().sample(logits[order], [rows[i] for i in order]).token_ids
    assert shuffled == [solo[i] for i in order]


def test_seeded_noise_depends_on_seed_and_step():
    logits = torch.zeros(1, 1000)
    sampler = Sampler()
    by_step = [
        sampler.sample(logits, [SamplingRow(temperature=1.0, seed=5, output_token_ids=[0] * step)]).token_ids[0]
        for step in range(20)
    ]
    assert len(set(by_step)) > 10
    again = sampler.sample(logits, [SamplingRow(temperature=1.0, seed=5, output_token_ids=[7] * 3)])
    assert again.token_ids[0] == by_step[3]  # same step, recomputed
    assert len({mix_seed(seed, step) for seed in range(50) for step in range(50)}) == 2500


def test_unseeded_reproducible_for_sampler_seed(device):
    logits = _random_logits(64, 500, seed=9, scale=0.5, device=device)
    rows = [SamplingRow(temperature=1.0, top_p=0.9) for _ in range(64)]

    def run(seed: int) -> list[list[int]]:
        sampler = Sampler(seed=seed)
        return [sampler.sample(logits, rows).token_ids for _ in range(3)]

    first = run(1)
    assert first == run(1)
    assert first != run(2)
    assert first[0] != first[1]  # the generator advances between steps


# ---------------------------------------------------------------- logprobs


def test_logprobs_are_raw_with_rank_and_sorted_top(device):
    logits = _random_logits(5, 200, seed=10, device=device)
    rows = [
        SamplingRow(temperature=0.0, num_logprobs=5),
        SamplingRow(
            temperature=1.5, seed=1, num_logprobs=3, top_k=20, repetition_penalty=1.5, output_token_ids=[3]
        ),
        SamplingRow(temperature=0.8, num_logprobs=0, banned_token_ids=[int(logits[2].argmax())]),
        SamplingRow(temperature=1.0, seed=2),
        SamplingRow(temperature=2.0, seed=3, num_logprobs=500, frequency_penalty=1.0, output_token_ids=[1, 1]),
    ]
    output = Sampler().sample(logits, rows)
    reference = torch.log_softmax(logits, dim=-1).cpu()
    assert output.logprobs[3] is None
    for i, (token, entry) in enumerate(zip(output.token_ids, output.logprobs)):
        if entry is None:
            continue
        assert entry.token_id == token
        assert entry.logprob == pytest.approx(reference[i, token].item(), abs=1e-5)
        assert entry.rank == int((reference[i] > reference[i, token]).sum()) + 1
        expected_count = min(rows[i].num_logprobs, 200)
        assert len(entry.top) == expected_count
        top_ids = [token_id for token_id, _ in entry.top]
        assert top_ids == reference[i].topk(expected_count).indices.tolist() if expected_count else True
        values = [value for _, value in entry.top]
        assert values == sorted(values, reverse=True)
        for token_id, value in entry.top:
            assert value == pytest.approx(reference[i, token_id].item(), abs=1e-5)
    assert output.logprobs[0].rank == 1
    assert output.logprobs[2].rank >= 2 and output.logprobs[2].top == []


# ---------------------------------------------------------------- devices & speed


def test_large_batch_is_fast_on_cpu():
    logits = _random_logits(64, 49152, seed=11)
    history = list(range(0, 49152, 97))
    rows = [
        SamplingRow(
            temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
            top_p=[1.0, 0.9, 0.95, 0.8][i % 4],
            top_k=[-1, 50, 0, 0][i % 4],
            min_p=0.02 if i % 3 == 0 else 0.0,
            repetition_penalty=1.1,
            frequency_penalty=0.3,
            seed=i if i % 2 else None,
            prompt_token_ids=history,
            output_token_ids=history[:100],
            num_logprobs=5 if i % 8 == 0 else None,
        )
        for i in range(64)
    ]
    sampler = Sampler()
    sampler.sample(logits, rows)  # warm-up
    # ~0.1 s on two idle cores. The bound only catches gross regressions (a
    # per-row or per-token Python loop): a busy shared machine is slow too.
    start = time.perf_counter()
    sampler.sample(logits, rows)
    assert time.perf_counter() - start < 10.0


@_NEEDS_CUDA
def test_cuda_sampling_never_waits_for_the_gpu():
    logits = _random_logits(16, 5000, seed=12, device="cuda")
    rows = _target_rows() + [_neighbour(i) for i in range(11)]
    sampler = Sampler(seed=3, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:  # everything up to the final transfer of results stays asynchronous
        processed = apply_bans_and_penalties(logits, rows)
        sampled = sorted((row for row in rows if not row.is_greedy), key=lambda row: row.seed is not None)
        sampler._sample_rows(processed[: len(sampled)], sampled)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@_NEEDS_CUDA
def test_cuda_filters_match_cpu():
    scaled = torch.cat([_random_logits(4, 8192, seed=6, scale=scale) for scale in (6.0, 1.5, 0.3)])
    rows = [SamplingRow(temperature=1.0, top_p=p, top_k=k, min_p=m)
            for p, k, m in [(0.9, -1, 0.0), (0.5, 100, 0.0), (0.99, 0, 0.01), (0.7, 1000, 0.0)] * 3]
    assert torch.equal(filter_cutoffs(scaled, rows), filter_cutoffs(scaled.cuda(), rows).cpu())


# ---------------------------------------------------------------- tokens left on the device


def test_sample_on_device_gives_samples_tokens_without_leaving_the_device(device):
    logits = _random_logits(6, 300, seed=4, device=device)
    rows = [SamplingRow(temperature=0.0), SamplingRow(temperature=0.8, seed=1, top_k=20),
            SamplingRow(temperature=1.1, seed=2, top_p=0.6), SamplingRow(temperature=0.5, seed=3, min_p=0.05),
            SamplingRow(temperature=0.9, seed=9, output_token_ids=[4, 5]), SamplingRow(temperature=0.0)]
    on_device = Sampler().sample_on_device(logits, rows)
    assert on_device.device == logits.device and on_device.dtype == torch.int64
    assert on_device.tolist() == Sampler().sample(logits, rows).token_ids
    with pytest.raises(ValueError, match="logprobs"):
        Sampler().sample_on_device(logits, [SamplingRow(temperature=0.5, num_logprobs=1)] * 6)


def test_a_pending_token_moves_a_seeded_row_one_generation_step_on():
    """A lookahead continuation samples token n + 1 while token n is not yet in the row's history: with one
    pending token it draws the very noise the row would draw once the history holds n tokens."""
    logits = _random_logits(1, 500, seed=8)
    history = [11, 12, 13]
    later = SamplingRow(temperature=1.0, seed=42, output_token_ids=history + [14])
    ahead = SamplingRow(temperature=1.0, seed=42, output_token_ids=history, num_pending_tokens=1)
    assert ahead.generation_step == later.generation_step == 4
    draws = [Sampler().sample(logits, [row]).token_ids[0] for row in (later, ahead)]
    assert draws[0] == draws[1]
    other_steps = {Sampler().sample(logits, [SamplingRow(temperature=1.0, seed=42, output_token_ids=[0] * n)]
                                    ).token_ids[0] for n in range(12)}
    assert len(other_steps) > 1  # the step does key the noise: not the same token at every step
