"""GenerationStream: the outputs of the engine requests behind one HTTP request, handed to its handler.

``joule.server.async_engine`` routes each report's outputs here from the engine loop; the handler iterates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from joule.outputs import RequestOutput, merge_delta_outputs


class AbortsRequests(Protocol):
    def abort(self, request_id: str) -> None: ...


_StreamItem = tuple[int, RequestOutput | BaseException]  # (prompt index, its output or the step's error)


class GenerationStream:
    """The outputs of the engine requests behind one HTTP request (one per prompt), in order of arrival.

    Iterating yields ``(prompt_index, RequestOutput)`` until every request has finished, and raises
    the error of a failed step. ``abort()`` is synchronous so it can run in a ``finally`` of a
    cancelled handler (a client that went away). With ``coalesce`` (DELTA outputs), the outputs that
    queued up while the handler was busy come out merged, one per prompt: a loaded event loop then
    writes once per stream per turn, not once per token.
    """

    def __init__(self, engine: "AbortsRequests", request_ids: list[str], coalesce: bool = False):
        self._engine = engine
        self.request_ids = request_ids
        self._queue: asyncio.Queue = asyncio.Queue()
        self._unfinished = set(range(len(request_ids)))
        self._coalesce = coalesce

    def _push(self, index: int, item: RequestOutput | BaseException) -> None:
        self._queue.put_nowait((index, item))

    @property
    def finished(self) -> bool:
        return not self._unfinished

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._unfinished:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            for index, item in self._merged(items) if self._coalesce else items:
                if isinstance(item, BaseException):
                    self._unfinished.discard(index)
                    raise item
                if item.finished:
                    self._unfinished.discard(index)
                yield index, item

    @staticmethod
    def _merged(items: list[_StreamItem]) -> list[_StreamItem]:
        """The items in order, each prompt's consecutive outputs merged into its latest unfinished one."""
        merged: list[_StreamItem] = []
        latest: dict[int, int] = {}  # prompt index -> position in merged of its latest entry
        for index, item in items:
            position = latest.get(index)
            if position is not None and isinstance(item, RequestOutput):
                earlier = merged[position][1]
                if isinstance(earlier, RequestOutput) and not earlier.finished:
                    merged[position] = (index, merge_delta_outputs(earlier, item))
                    continue
            latest[index] = len(merged)
            merged.append((index, item))
        return merged

    def abort(self) -> None:
        """Abort whatever has not finished; safe to call more than once and after the end."""
        for index in sorted(self._unfinished):
            self._engine.abort(self.request_ids[index])
        self._unfinished.clear()
