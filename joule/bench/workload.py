"""Synthetic workloads with fixed seeds, so every engine sees the very same prompts."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class SyntheticRequest:
    prompt_token_ids: list[int]
    output_len: int


def fixed_length_workload(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0, avoid_ids=frozenset()
) -> list[SyntheticRequest]:
    """Random token prompts of one length; ids in ``avoid_ids`` (special tokens) are skipped."""
    generator = random.Random(seed)
    low = 0
    candidates = [token for token in range(low, vocab_size) if token not in avoid_ids] if avoid_ids else None
    requests = []
    for _ in range(num_prompts):
        if candidates is not None:
            ids = [generator.choice(candidates) for _ in range(input_len)]
        else:
            ids = [generator.randrange(vocab_size) for _ in range(input_len)]
        requests.append(SyntheticRequest(ids, output_len))
    return requests


def uniform_length_workload(
    num_prompts: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0
) -> list[SyntheticRequest]:
    """Input and output lengths uniform in [min_len, max_len] (nano-vllm's published workload)."""
    generator = random.Random(seed)
    requests = []
    for _ in range(num_prompts):
        input_len = generator.randint(min_len, max_len)
        output_len = generator.randint(min_len, max_len)
        requests.append(SyntheticRequest([generator.randrange(vocab_size) for _ in range(input_len)], output_len))
    return requests
