"""The sampler's fused mode: temperature rows sampled by one Triton kernel pair, their noise Philox's.

Why: the torch race costs a sampled row ~10 launches a step and a one-SM argmax (``joule/kernels/sample_rows.py``).
On by default with CUDA since it was measured on the H100 (2026-12-06 (m): batch 1 at T=0.8 985 against 940 tok/s
with the lookahead, 792 against 750 without; docs/benchmarks.md); ``JOULE_FUSED_SAMPLING=0`` goes back to the torch
race, ``Sampler(fused=True)`` runs it on any device (tests use it under Triton's interpreter). Noise in this mode is
``tl.rand(row seed, column)`` for every sampled row, in the kernel or, for steps with top-k/top-p/min-p rows (which
the kernel does not filter), drawn by ``draw_uniforms`` into the torch race: a seeded row's noise still depends on its
seed and generation step alone, whatever else is in the batch. Its tokens differ from the torch race's for the same
seed (another generator).
"""

from __future__ import annotations

import os
import random

import torch

from joule.runtime.device import upload
from joule.runtime.logit_processors import row_values

FUSED_SAMPLING_ENV = "JOULE_FUSED_SAMPLING"


def fused_sampling_requested() -> bool:
    """On unless the environment turns it off."""
    return os.environ.get(FUSED_SAMPLING_ENV, "1").lower() not in ("0", "off", "false")


def filters(row, vocab_size: int) -> bool:
    """The row asks for top-k, top-p or min-p (which the fused kernel does not apply)."""
    return 0 < row.top_k < vocab_size or row.top_p < 1.0 or row.min_p > 0.0


class FusedSampling:
    """Per-row seeds and the kernel's arguments. Unseeded rows draw a 64-bit seed per step from a host generator
    seeded with the sampler's seed, so a run is reproducible for an engine seed and batch schedule, as before."""

    def __init__(self, seed: int, enabled: bool | None) -> None:
        self.enabled = enabled  # None: on CUDA unless JOULE_FUSED_SAMPLING=0 (read once, not every step)
        self._on_cuda = fused_sampling_requested() if enabled is None else enabled
        self._unseeded = random.Random(seed)

    def applies(self, device: torch.device) -> bool:
        if self.enabled is not None:
            return self.enabled
        return self._on_cuda and device.type == "cuda"

    def row_seeds(self, rows, device: torch.device) -> torch.Tensor:
        from joule.kernels.sample_rows import signed_seeds
        from joule.runtime.sampler import mix_seed

        seeds = [0 if row.is_greedy else mix_seed(row.seed, row.generation_step) if row.seed is not None
                 else self._unseeded.getrandbits(64) for row in rows]
        return upload(torch.tensor(signed_seeds(seeds), dtype=torch.int64), device)

    def tokens(self, logits: torch.Tensor, rows, seeds: torch.Tensor) -> torch.Tensor:
        """Every row's token in two launches (no row filters): greedy rows the argmax, the others the race."""
        from joule.kernels.sample_rows import sample_rows

        device = logits.device
        inverse = row_values([1.0 if row.is_greedy else 1.0 / row.temperature for row in rows], device)
        noise_on = upload(torch.tensor([int(not row.is_greedy) for row in rows], dtype=torch.int32), device)
        return sample_rows(logits, seeds, inverse, noise_on)

    @staticmethod
    def uniforms(seeds: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """The ``[rows, vocab]`` uniforms the kernel would draw: the torch race's noise in this mode."""
        from joule.kernels.sample_rows import draw_uniforms

        return draw_uniforms(seeds, vocab_size)
