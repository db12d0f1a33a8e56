"""Pick the attention backend for a device: Triton kernels on CUDA, plain torch elsewhere."""

from __future__ import annotations

import torch

from joule.runtime.attention.base import AttentionBackend
from joule.runtime.attention.portable import PortableAttentionBackend


def triton_unavailable_reason() -> str | None:
    """Why the Triton backend cannot run here, or None when it can."""
    try:
        import triton  # noqa: F401
    except ImportError as error:
        return f"triton is not importable ({error})"
    return None


def select_attention_backend(device: torch.device | str) -> AttentionBackend:
    """TritonAttentionBackend on a CUDA device when triton imports; PortableAttentionBackend otherwise."""
    device = torch.device(device)
    if device.type == "cuda" and triton_unavailable_reason() is None:
        from joule.runtime.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    return PortableAttentionBackend()
