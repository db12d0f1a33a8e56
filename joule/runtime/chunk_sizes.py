"""Which prompt-chunk graphs a chunk replays: the captured sizes and how a chunk is cut into passes.

Torch-free, so the performance model (``joule.perf.step_model``) predicts the very passes that
``joule.runtime.prefill_graphs`` runs.
"""

from __future__ import annotations

SMALLEST_CHUNK_GRAPH = 16
LARGEST_CHUNK_GRAPH = 8192  # a longer chunk amortises eager launches by itself; its graph would pin GBs
# A chunk is run as several graph passes (4608 tokens: 4096 + 512) when padding it to one graph would
# compute at least this many padding rows: a pass costs one more read of the weights (~0.6 ms for a 1B
# model on an H200), a padding row ~4 us of GEMMs there.
MIN_PADDING_TO_SPLIT = 256


def chunk_pieces(num_tokens: int, sizes: list[int], min_padding_to_split: int = MIN_PADDING_TO_SPLIT) -> list[int]:
    """Lengths of the consecutive graph passes that run one chunk: the largest captured size that fits,
    again and again, while padding the rest to one graph would waste ``min_padding_to_split`` rows."""
    pieces, remaining = [], num_tokens
    while True:
        padded = next((size for size in sizes if size >= remaining), None)
        below = max((size for size in sizes if size <= remaining), default=None)
        if padded is not None and (below is None or padded - remaining < min_padding_to_split):
            pieces.append(remaining)
            return pieces
        pieces.append(below)
        remaining -= below
        if remaining == 0:
            return pieces


def chunk_graph_sizes(max_num_batched_tokens: int) -> list[int]:
    """Captured chunk sizes: powers of two from 16 up to the step's token budget (kept as the last size),
    at most LARGEST_CHUNK_GRAPH."""
    if max_num_batched_tokens < 2:
        raise ValueError(f"max_num_batched_tokens must be at least 2, got {max_num_batched_tokens}")
    largest = min(max_num_batched_tokens, LARGEST_CHUNK_GRAPH)
    sizes, size = [], SMALLEST_CHUNK_GRAPH
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return sizes
