"""Choosing the device, the dtype and how much memory the KV cache gets."""

from __future__ import annotations

import os

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

_CPU_KV_SHARE_OF_AVAILABLE = 0.10
_CPU_KV_MAX_BYTES = 2 << 30
_GPU_ACTIVATION_RESERVE_BYTES = 2 << 30


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} was requested but no CUDA GPU is available; use device='cpu'.")
    if not (device == "cpu" or device.startswith("cuda")):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}.")
    return torch.device(device)


def cpu_supports_bfloat16() -> bool:
    """True when the CPU has AMX bf16 tiles, the only CPU path where bf16 matmuls beat float32.

    AVX-512 BF16 alone is not enough: measured on such a CPU (no AMX), torch's bf16
    GEMM ran at ~147 GFLOP/s against ~238 for float32.
    """
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return False
    return "amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: torch.device, checkpoint_dtype: str | None = None) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}.")
        return _DTYPES[dtype]
    if device.type == "cuda":
        if checkpoint_dtype == "float16":
            return torch.float16
        return torch.bfloat16
    return torch.bfloat16 if cpu_supports_bfloat16() else torch.float32


def available_host_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def default_kv_cache_bytes(device: torch.device, gpu_memory_utilization: float = 0.9) -> int:
    """A KV budget when the user gave none: a share of free memory left after the weights."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used = total - free
        budget = int(total * gpu_memory_utilization) - used - _GPU_ACTIVATION_RESERVE_BYTES
        return max(budget, 0)
    return min(int(available_host_memory_bytes() * _CPU_KV_SHARE_OF_AVAILABLE), _CPU_KV_MAX_BYTES)


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without a stream sync (a plain copy would wait for the GPU): through pinned memory,
    non-blocking; on the CPU, the tensor itself."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
