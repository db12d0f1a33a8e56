"""A CPU engine's large temporaries served from memory the process already holds, not from fresh pages (glibc).

Why: glibc hands out allocations above its mmap threshold (128 KiB at first, raised as large blocks are freed) as
fresh mappings, and gives freed memory at the heap's top back to the system past its trim threshold. A CPU step's
temporaries (a 2,048-row prompt step's MLP activations, the decode steps' dense KV copies: megabytes each, every
step) then come back as new pages that fault in one 4 KiB page at a time: 40-60k faults a prompt step of the default
model on the 2-core development VM, and the first decode step of a batch spent more time in faults than in its
GEMMs. Keeping blocks up to 32 MiB in the heap and keeping freed memory below 1 GiB stopped them (0 faults a run)
and ran the issue-2 workload ~11 % faster (``joule bench throughput --dtype bfloat16 --num-prompts 32 --input-len
128 --output-len 64``; docs/benchmarks.md). The price is that memory freed after a peak stays with the process (up to
the trim threshold), as a serving engine's memory does anyway. ``JOULE_KEEP_FREED_MEMORY=0`` leaves glibc's defaults.
"""

from __future__ import annotations

import ctypes
import os
import sys

# mallopt's parameter numbers (glibc's malloc.h).
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_THRESHOLD_BYTES = 32 << 20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20  # the heap grows in steps this large (address space; pages are touched when used)
ENVIRONMENT_SWITCH = "JOULE_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Apply the settings above to this process's allocator; True when glibc took all three.

    Both thresholds are needed: with the mmap threshold alone freed blocks still leave through the trim, and with
    the trim threshold alone large blocks are still fresh mappings (slower than the defaults, measured)."""
    if os.environ.get(ENVIRONMENT_SWITCH, "1") in ("0", "false", "off") or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False  # not glibc (or no mallopt): nothing to tune
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES), (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
                (M_TOP_PAD, TOP_PAD_BYTES))
    return all(mallopt(parameter, value) == 1 for parameter, value in settings)
