"""AsyncEngine: the blocking LLMEngine on its own thread, fed and drained from asyncio.

The event loop never runs a model step. Handlers put commands (add, abort) into a thread-safe
queue; the engine thread applies them between steps, steps while there is work, and hands each
step's outputs back to the loop in one ``call_soon_threadsafe`` call, which routes them to the
per-HTTP-request ``GenerationStream`` queues. Only the engine thread touches the LLMEngine, so the
engine itself needs no locks.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from joule.engine.request import RequestSLO
from joule.logger import get_logger
from joule.outputs import RequestOutput, merge_delta_outputs
from joule.sampling_params import RequestOutputKind, SamplingParams

logger = get_logger()


class QueueFullError(Exception):
    """The waiting queue holds ``max_queue`` requests already; the client should retry later."""


class EngineStepError(Exception):
    """A model step raised; the requests it carried are failed, the engine keeps serving."""


class EngineStoppedError(Exception):
    """The engine is shutting down and accepts no more work."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot the engine thread publishes after every loop turn, for gauges and admission."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_used_blocks: int = 0
    num_blocks: int = 0


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    tenant: str | None
    slo: RequestSLO | None
    arrival_time: float
    stream: "GenerationStream"
    index: int
    accepted: asyncio.Future


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Route:
    stream: "GenerationStream"
    index: int
    num_samples: int = 1
    tenant: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0  # summed over the (DELTA) outputs seen so far
    energy_joules: float = 0.0  # the latest output's figure: joules so far

    def observe(self, output: RequestOutput) -> None:
        self.generated_tokens += sum(len(completion.token_ids) for completion in output.outputs)
        if output.metrics is not None and output.metrics.energy_joules is not None:
            self.energy_joules = max(self.energy_joules, output.metrics.energy_joules)


_StreamItem = tuple[int, RequestOutput | BaseException]  # (prompt index, its output or the step's error)


class GenerationStream:
    """The outputs of the engine requests behind one HTTP request (one per prompt), in order of arrival.

    Iterating yields ``(prompt_index, RequestOutput)`` until every request has finished, and raises
    the error of a failed step. ``abort()`` is synchronous so it can run in a ``finally`` of a
    cancelled handler (a client that went away). With ``coalesce`` (DELTA outputs), the outputs that
    queued up while the handler was busy come out merged, one per prompt: a loaded event loop then
    writes once per stream per turn, not once per token.
    """

    def __init__(self, engine: "AsyncEngine", request_ids: list[str], coalesce: bool = False):
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


@dataclass
class _EngineThreadState:
    """Owned by the engine thread only."""

    routes: dict[str, _Route] = field(default_factory=dict)
    prefix_queries: int = 0
    prefix_hits: int = 0
    preemptions: int = 0


class AsyncEngine:
    """Runs ``engine`` (an LLMEngine or anything with its add/abort/step surface) on a thread."""

    def __init__(self, engine, metrics=None, max_queue: int | None = None, idle_poll_seconds: float = 0.5,
                 abuse_guard=None):
        """``abuse_guard`` (an AbuseGuard) is charged each request's tokens and joules as it ends."""
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer or None, got {max_queue}.")
        self.engine = engine
        self.metrics = metrics
        self.abuse_guard = abuse_guard
        self.max_queue = max_queue
        self._idle_poll_seconds = idle_poll_seconds
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._state = _EngineThreadState()
        self._stats = EngineStats()
        self._pending_adds = 0  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._publish_stats()
        self._thread = threading.Thread(target=self._run, name="joule-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the thread; requests still in flight are aborted and their streams told so."""
        self._stopping.set()
        self._commands.put(None)
        if self._thread is not None:
            self._thread.join(timeout)

    # -- called on the event loop ------------------------------------------------------------
    async def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        priority: int = 0,
        tenant: str | None = None,
        slo: RequestSLO | None = None,
    ) -> GenerationStream:
        """Queue one engine request per prompt; raises ValueError (bad request) or QueueFullError.

        ``tenant`` is the API's ``user`` as the engine's scheduler sees it (None allowed); the abuse
        guard bills requests without one to its anonymous tenant.
        """
        if not self.is_running:
            raise EngineStoppedError("the engine is not running")
        if self.max_queue is not None:
            waiting = self._stats.num_waiting + self._pending_adds
            if waiting + len(prompts) * params.n > self.max_queue:
                raise QueueFullError(
                    f"the waiting queue is full ({waiting} of max_queue={self.max_queue} requests waiting)"
                )
        request_ids = [request_id if len(prompts) == 1 else f"{request_id}-{index}" for index in range(len(prompts))]
        stream = GenerationStream(self, request_ids, coalesce=params.output_kind == RequestOutputKind.DELTA)
        loop = asyncio.get_running_loop()
        arrival = time.time()
        accepted = []
        for index, (child_id, prompt_ids) in enumerate(zip(request_ids, prompts)):
            future = loop.create_future()
            accepted.append(future)
            self._commands.put(
                _Add(child_id, prompt_ids, params, priority, tenant, slo, arrival, stream, index, future)
            )
        added = len(prompts) * params.n
        self._pending_adds += added
        try:
            await asyncio.gather(*accepted)
        except BaseException:
            stream.abort()
            raise
        finally:
            self._pending_adds -= added
        return stream

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    def _dispatch(self, deliveries: list[tuple[GenerationStream, int, RequestOutput | BaseException]]) -> None:
        for stream, index, item in deliveries:
            stream._push(index, item)

    # -- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._apply_commands(block=not self.engine.has_unfinished_requests())
                if self._stopping.is_set():
                    break
                if self.engine.has_unfinished_requests():
                    self._step()
                self._publish_stats()
            except Exception as error:  # a bug outside step(): fail what is in flight, keep serving
                logger.exception("engine loop error")
                self._fail_all(EngineStepError(f"engine error: {type(error).__name__}"))
        self._fail_all(EngineStoppedError("the server is shutting down"))
        self._publish_stats()

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=self._idle_poll_seconds) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            if isinstance(command, _Add):
                self._add(command)
            elif isinstance(command, _Abort):
                self._abort(command.request_id, reason="abort")
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _add(self, command: _Add) -> None:
        try:
            self.engine.add_request(
                command.request_id,
                {"prompt_token_ids": command.prompt_token_ids},
                command.params,
                arrival_time=command.arrival_time,
                priority=command.priority,
                tenant=command.tenant,
                slo=command.slo,
            )
        except ValueError as error:
            self._resolve(command.accepted, error)
            return
        self._state.routes[command.request_id] = _Route(
            command.stream, command.index, command.params.n, tenant=command.tenant,
            prompt_tokens=len(command.prompt_token_ids),
        )
        self._resolve(command.accepted, None)

    def _abort(self, request_id: str, reason: str) -> None:
        route = self._state.routes.pop(request_id, None)
        if route is None:
            return
        ledger = getattr(self.engine, "energy_ledger", None)
        released_before = ledger.released_joules if ledger is not None else 0.0
        self.engine.abort_request(request_id)
        if ledger is not None:  # the abort released the request's joules: all of them, not just the last output's
            route.energy_joules = max(route.energy_joules, ledger.released_joules - released_before)
        if self.metrics is not None:
            self.metrics.on_abort(request_id, reason, route.num_samples)
        self._charge(route)

    def _charge(self, route: _Route) -> None:
        """Bill a request that ended (finished or aborted) for what it used: prompt + generated, joules."""
        if self.abuse_guard is not None:
            self.abuse_guard.charge(self.abuse_guard.tenant_of(route.tenant),
                                    route.prompt_tokens + route.generated_tokens, route.energy_joules)

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as error:
            logger.exception("engine step failed; failing the %d requests in flight", len(self._state.routes))
            self._fail_all(EngineStepError(f"the engine failed while generating: {type(error).__name__}"))
            return
        now = time.time()
        first_tokens, later_tokens = [], []
        for output in outputs:
            route = self._state.routes.get(output.request_id)
            if route is None:
                continue
            if self.metrics is not None:
                self.metrics.on_output(output, now)
            first = route.generated_tokens == 0
            route.observe(output)
            if output.finished:
                del self._state.routes[output.request_id]
                self._charge(route)
            (first_tokens if first else later_tokens).append((route.stream, route.index, output))
        if first_tokens or later_tokens:
            # First tokens go out first: a loaded event loop delays one more token of a running stream,
            # not a new request's time to first token.
            self._loop.call_soon_threadsafe(self._dispatch, first_tokens + later_tokens)

    def _fail_all(self, error: BaseException) -> None:
        deliveries = []
        for request_id, route in list(self._state.routes.items()):
            try:
                self._abort(request_id, reason="error")
            except Exception:
                logger.exception("could not abort request %s", request_id)
                self._state.routes.pop(request_id, None)
            deliveries.append((route.stream, route.index, error))
        if deliveries and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, deliveries)

    def _resolve(self, future: asyncio.Future, error: BaseException | None) -> None:
        def settle() -> None:
            if future.done():
                return
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

        self._loop.call_soon_threadsafe(settle)

    def _publish_stats(self) -> None:
        scheduler = self.engine.core.scheduler
        blocks = self.engine.block_manager
        self._stats = EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=blocks.usage,
            num_used_blocks=blocks.num_used_blocks,
            num_blocks=blocks.num_blocks,
        )
        if self.metrics is None:
            return
        state = self._state
        self.metrics.set_engine_stats(self._stats)
        self.metrics.add_prefix_cache(
            blocks.prefix_cache_queries - state.prefix_queries, blocks.prefix_cache_hits - state.prefix_hits
        )
        self.metrics.add_preemptions(scheduler.num_preemptions - state.preemptions)
        state.prefix_queries, state.prefix_hits = blocks.prefix_cache_queries, blocks.prefix_cache_hits
        state.preemptions = scheduler.num_preemptions
        ledger = getattr(self.engine, "energy_ledger", None)
        if ledger is not None:  # read here, on the engine thread: the ledger is not thread-safe
            self.metrics.set_energy_totals(ledger.totals(), time.time())
