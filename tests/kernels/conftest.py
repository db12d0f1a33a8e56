"""Kernel tests run through Triton's interpreter on machines without CUDA, so CI needs no flags.

The variable must be set before any kernel module is imported (``triton.jit`` reads it then).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
