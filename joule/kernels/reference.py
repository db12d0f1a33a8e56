"""Plain-torch reference versions of the Triton kernels, for tests and the GPU check.

They favour obvious correctness over speed: every sequence is gathered from its
blocks and attended densely, with the softmax in float64 unless told otherwise.
"""

from __future__ import annotations

import torch


def write_kv_cache_reference(key, value, key_cache, value_cache, slot_mapping) -> None:
    """Scatter rows into the flattened cache; negative slots are padding and skipped."""
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    flat_shape = (-1, *key_cache.shape[2:])
    key_cache.view(flat_shape)[slots] = key[keep].to(key_cache.dtype)
    value_cache.view(flat_shape)[slots] = value[keep].to(value_cache.dtype)


def gather_sequence(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached tokens of one sequence, ``[length, Hkv, D]``."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    blocks = block_table[:num_blocks].long()
    return cache[blocks].reshape(-1, *cache.shape[2:])[:length]


def paged_attention_reference(
    query: torch.Tensor,  # [T, Hq, D]
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [S, max_blocks]
    query_lengths: list[int],
    sequence_lengths: list[int],
    scale: float,
    compute_dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Causal attention of each sequence's new rows over its whole cached sequence (decode and prefill)."""
    output = torch.empty(query.shape, dtype=compute_dtype, device=query.device)
    start = 0
    for index, (query_length, sequence_length) in enumerate(zip(query_lengths, sequence_lengths)):
        end = start + query_length
        context_length = sequence_length - query_length
        keys = gather_sequence(key_cache, block_tables[index], sequence_length).to(compute_dtype)
        values = gather_sequence(value_cache, block_tables[index], sequence_length).to(compute_dtype)
        group = query.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", query[start:end].to(compute_dtype), keys) * scale
        positions = torch.arange(context_length, sequence_length, device=query.device)
        allowed = torch.arange(sequence_length, device=query.device)[None, :] <= positions[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
        output[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)
        start = end
    return output


def rms_norm_reference(hidden, weight, eps, residual=None):
    """Hugging Face's RMSNorm (float32 statistics, cast back before the weight); with
    ``residual``, first ``hidden + residual`` in the input dtype, returned as the new residual."""
    if residual is not None:
        hidden = hidden + residual
        residual = hidden
    normed = hidden.float() * torch.rsqrt(hidden.float().pow(2).mean(-1, keepdim=True) + eps)
    output = weight * normed.to(hidden.dtype)
    return output if residual is None else (output, residual)


def rotary_reference(query, key, cos, sin, query_norm_weight=None, key_norm_weight=None, eps=1e-6):
    """Optional per-head RMSNorm (Qwen3's q/k norm), then Hugging Face's half-split rotation, all in
    float32 and rounded once; returns new ``(query, key)``."""

    def one(tensor, norm_weight):
        values = tensor.float()
        if norm_weight is not None:
            values = values * torch.rsqrt(values.pow(2).mean(-1, keepdim=True) + eps)
            values = values.to(tensor.dtype).float() * norm_weight.float()
        first, second = values.chunk(2, dim=-1)
        cos_rows, sin_rows = cos.float()[:, None, :], sin.float()[:, None, :]
        rotated = torch.cat((first * cos_rows - second * sin_rows, second * cos_rows + first * sin_rows), dim=-1)
        return rotated.to(tensor.dtype)

    return one(query, query_norm_weight), one(key, key_norm_weight)


def silu_and_mul_reference(gate_up):
    """``silu(gate) * up`` of a ``[T, 2I]`` gate/up output, in float32, rounded once."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(gate_up.dtype)
