"""Keep the cyclic garbage collector off the heap that existed before a run of engine steps.

A full collection walks every tracked container object. After start-up most of them are torch's and Triton's
modules and the engine itself (~300k objects on the dev CPU: ~100 ms a full collection), and none of them is
garbage; the collector's own rule (a full collection once the objects that survived younger collections reach a
quarter of the old generation) fired once or twice per 256-request run that streams DELTA outputs, inside the run
(pauses up to 164 ms on the dev CPU; docs/benchmarks.md (g)). Freezing
what exists when a run starts leaves those collections only the run's own objects to walk; unfreezing when it
ends hands everything back, so nothing is kept alive that would otherwise be freed.

Full collections are also held off for the run (the oldest generation's threshold raised, then restored), frozen
heap or not: on the H100 machine something had frozen 375 objects before any run, so runs left the heap unfrozen,
and full collections walked ~280k objects inside runs: 150-177 ms pauses, workload 3's slow runs (docs/benchmarks.md
2026-12-05 (e)). Young collections go on, so a run's short-lived cycles are still freed; older ones wait for the
run's end.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator

# The oldest generation's threshold while a run goes on: the number of young-generation collections before a full
# one, far more than any run makes.
NO_FULL_COLLECTIONS = 1 << 30


@contextlib.contextmanager
def heap_frozen_while_running() -> Iterator[None]:
    """No full collections for the block, and ``gc.freeze()`` for it where nobody froze the heap before; both
    undone after it. A heap someone already froze (the server freezes its start-up heap for its whole life, a user
    or a library may too: on the H100 machine 375 objects were frozen before any run) stays frozen: unfreezing
    would undo theirs."""
    thresholds = gc.get_threshold()
    ours = not gc.get_freeze_count()
    if ours:
        gc.freeze()
    gc.set_threshold(thresholds[0], thresholds[1], NO_FULL_COLLECTIONS)
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        if ours:
            gc.unfreeze()
