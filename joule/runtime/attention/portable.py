"""Attention over the paged KV cache in plain PyTorch (CPU and CUDA).

Decode-only steps (one query row per sequence) gather every sequence's
context into one padded batch and run a single attention call, which is what
keeps CPU decoding fast at large batch sizes. What that gather needs (block
ids, padding mask) depends only on the step, so it is built once per step and
shared by every layer. Steps with prompt chunks loop over sequences, each with
its own causal mask.

GQA is handled without copying KV heads: the query heads that share a KV head
are folded into the query-row dimension, ``[Hkv, group * rows, D]``, so one
batched matmul covers the whole group. ``scaled_dot_product_attention``
accumulates the softmax in float32 for half-precision inputs on both devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from joule.runtime.attention.base import AttentionBackend, AttentionMetadata, KVCache, check_attention_inputs


@dataclass
class _DecodeStep:
    """Per-step inputs of the padded decode attention, identical for every layer."""

    metadata: AttentionMetadata
    sequence_lengths: list[int]  # a copy: a reused metadata object with new lengths is a new step
    flat_blocks: torch.Tensor  # int64 [S * num_blocks]: each sequence's blocks, padded with block 0
    padded_length: int  # num_blocks * block_size
    mask: torch.Tensor  # bool [S, 1, 1, padded_length]: True for the sequence's real keys


class PortableAttentionBackend(AttentionBackend):
    name = "portable"

    def __init__(self) -> None:
        self._decode_step: _DecodeStep | None = None

    def forward(
        self,
        layer_index: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        key_cache = kv_cache.key_caches[layer_index]
        value_cache = kv_cache.value_caches[layer_index]
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        check_attention_inputs(query, key, key_cache, metadata)
        _write_kv(key, key_cache, metadata.slot_mapping)
        _write_kv(value, value_cache, metadata.slot_mapping)

        if metadata.num_sequences == 0:
            return query.new_empty(query.shape)
        if metadata.is_decode_only:
            return _decode(query, key_cache, value_cache, self._decode_step_for(metadata, key_cache), scale)
        return _prefill(query, key, value, key_cache, value_cache, metadata, scale)

    def _decode_step_for(self, metadata: AttentionMetadata, key_cache: torch.Tensor) -> _DecodeStep:
        """The step's gather indices and mask, built by the first layer and reused by the others."""
        step = self._decode_step
        if step is None or step.metadata is not metadata or step.sequence_lengths != metadata.sequence_lengths:
            step = self._decode_step = _build_decode_step(metadata, key_cache.shape[1], key_cache.device)
        return step


def _write_kv(rows: torch.Tensor, cache: torch.Tensor, slots: torch.Tensor) -> None:
    """Store ``rows`` ``[T, Hkv, D]`` at cache ``slots``.

    ``index_copy_`` over flattened slots is one row copy per token; indexed
    assignment (``cache[slots] = rows``) goes through the much slower general
    index_put kernel on CPU.
    """
    flat_cache = cache.view(-1, cache.shape[2] * cache.shape[3])
    flat_cache.index_copy_(0, slots, rows.reshape(rows.shape[0], -1).to(cache.dtype))


def _build_decode_step(metadata: AttentionMetadata, block_size: int, device: torch.device) -> _DecodeStep:
    max_length = metadata.max_sequence_length
    num_blocks = -(-max_length // block_size)
    if metadata.block_tables.shape[1] < num_blocks:
        raise ValueError(
            f"block_tables has {metadata.block_tables.shape[1]} columns; {num_blocks} needed for {max_length} tokens"
        )
    flat_blocks = metadata.block_tables[:, :num_blocks].reshape(-1).long()
    padded_length = num_blocks * block_size
    lengths = torch.tensor(metadata.sequence_lengths, device=device)
    key_positions = torch.arange(padded_length, device=device)
    mask = (key_positions[None, :] < lengths[:, None])[:, None, None, :]
    return _DecodeStep(metadata, list(metadata.sequence_lengths), flat_blocks, padded_length, mask)


def _decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    step: _DecodeStep,
    scale: float,
) -> torch.Tensor:
    """One padded batched attention call for S sequences with one query row each."""
    num_sequences, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    padded_shape = (num_sequences, step.padded_length, num_kv_heads, head_dim)
    keys = _gather_blocks(key_cache, step.flat_blocks).view(padded_shape).transpose(1, 2).to(query.dtype)
    values = _gather_blocks(value_cache, step.flat_blocks).view(padded_shape).transpose(1, 2).to(query.dtype)
    grouped_query = query.reshape(num_sequences, num_kv_heads, group, head_dim)
    output = F.scaled_dot_product_attention(grouped_query, keys, values, attn_mask=step.mask, scale=scale)
    return output.reshape(num_sequences, num_heads, head_dim)


def _prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Per-sequence causal attention over cached context plus the new rows."""
    block_size = key_cache.shape[1]
    output = torch.empty_like(query)
    start = 0
    for index, (query_length, context_length) in enumerate(zip(metadata.query_lengths, metadata.context_lengths)):
        end = start + query_length
        total_length = context_length + query_length
        if context_length == 0 and key_cache.dtype == key.dtype:
            # Fresh prompt: the new rows are the whole context; skip the cache gather.
            keys, values = key[start:end], value[start:end]
        else:
            num_blocks = -(-total_length // block_size)
            blocks = metadata.block_tables[index, :num_blocks].long()
            if blocks.shape[0] < num_blocks:
                raise ValueError(
                    f"block table of sequence {index} has {blocks.shape[0]} columns; "
                    f"{num_blocks} needed for {total_length} tokens"
                )
            keys = _gather_blocks(key_cache, blocks)[:total_length].to(query.dtype)
            values = _gather_blocks(value_cache, blocks)[:total_length].to(query.dtype)
        output[start:end] = _causal_attention(query[start:end], keys, values, context_length, scale)
        start = end
    return output


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The tokens of ``blocks`` in order, ``[len(blocks) * block_size, Hkv, D]``.

    index_select over whole flattened blocks is a plain row copy, much faster on
    CPU than fancy indexing the 4-D cache.
    """
    return cache.view(cache.shape[0], -1).index_select(0, blocks).view(-1, *cache.shape[2:])


def _causal_attention(
    query: torch.Tensor,  # [Q, Hq, D], rows at positions context_length .. context_length + Q - 1
    keys: torch.Tensor,  # [L, Hkv, D], L = context_length + Q
    values: torch.Tensor,
    context_length: int,
    scale: float,
) -> torch.Tensor:
    query_length, num_heads, head_dim = query.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    if context_length == 0:
        # Whole prompt in one chunk: the fused causal kernel needs no mask. It does not
        # take grouped KV heads on CPU (it falls back to a slow path), so expand them.
        if group > 1:
            keys = keys.repeat_interleave(group, dim=1)
            values = values.repeat_interleave(group, dim=1)
        attended = F.scaled_dot_product_attention(  # 4-D inputs reach the fused CPU kernel; 3-D do not
            query.transpose(0, 1)[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
            is_causal=True, scale=scale,
        )
        return attended[0].transpose(0, 1)
    # Fold each KV head's query heads into rows: [Hkv, group * Q, D], row = g * Q + j.
    grouped = query.view(query_length, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
    grouped = grouped.reshape(num_kv_heads, group * query_length, head_dim)
    query_positions = torch.arange(context_length, context_length + query_length, device=query.device)
    key_positions = torch.arange(keys.shape[0], device=query.device)
    mask = (key_positions[None, :] <= query_positions[:, None]).repeat(group, 1)  # [group * Q, L]
    attended = F.scaled_dot_product_attention(
        grouped[None], keys.transpose(0, 1)[None], values.transpose(0, 1)[None], attn_mask=mask, scale=scale
    )[0]
    attended = attended.view(num_kv_heads, group, query_length, head_dim).permute(2, 0, 1, 3)
    return attended.reshape(query_length, num_heads, head_dim)
