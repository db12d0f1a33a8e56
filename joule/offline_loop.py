"""The offline loop shared by ``LLM.generate`` and the benchmarks: requests go in as the engine wants them.

Why not add every request first: adding 256 requests took ~10 ms of host time on the H100 machine while the GPU sat
idle (~1 % of issue 3's workload 3). Here the first steps' worth goes in, the first step starts, and the rest are
added between steps, while the GPU runs the step queued before (``LLMEngine.add_while_wanted`` stops once the
waiting queue holds enough that no step plans differently).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from joule.outputs import RequestOutput


def run_until_done(engine, add_next: Callable[[], bool], on_output: Callable[[RequestOutput], None]) -> None:
    """Step ``engine`` until every request is done. ``add_next()`` adds one more request (or refuses one, with no
    request added) and returns False once none is left; ``on_output`` sees every output of every step."""
    all_added = False
    while True:
        if not all_added:
            all_added = not engine.add_while_wanted(add_next)
        if not engine.has_unfinished_requests():  # add_while_wanted stops early only with requests waiting
            return
        for output in engine.step():
            on_output(output)


def adder(engine, requests: Iterable[tuple]) -> Callable[[], bool]:
    """``add_next`` for ``run_until_done`` over ``(request_id, prompt, params)`` triples."""
    pending = iter(requests)

    def add_next() -> bool:
        item = next(pending, None)
        if item is None:
            return False
        engine.add_request(*item)
        return True

    return add_next
