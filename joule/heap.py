"""Keep the cyclic garbage collector off the heap that existed before a run of engine steps.

A full collection walks every tracked container object. After start-up most of them are torch's and Triton's
modules and the engine itself (~300k objects on the dev CPU: ~100 ms a full collection), and none of them is
garbage; the collector's own rule (a full collection once the objects that survived younger collections reach a
quarter of the old generation) fired once or twice per 256-request run that streams DELTA outputs, inside the run
(pauses up to 164 ms on the dev CPU; docs/benchmarks.md (g)). Freezing
what exists when a run starts leaves those collections only the run's own objects to walk; unfreezing when it
ends hands everything back, so nothing is kept alive that would otherwise be freed.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def heap_frozen_while_running() -> Iterator[None]:
    """``gc.freeze()`` for the block, ``gc.unfreeze()`` after it. A heap someone already froze (the server
    freezes its start-up heap for its whole life, a user may too) is left as it is: unfreezing would undo
    theirs."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
