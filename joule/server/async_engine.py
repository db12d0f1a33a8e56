"""AsyncEngine: the API side of the server's engine loop, fed and drained from asyncio.

The event loop never runs a model step. Handlers send commands (add, abort) to the engine loop
(``joule.server.engine_loop``), which runs on a thread or in its own process
(``joule.server.engine_channels``) and answers each loop turn with one report. A report is applied
(Prometheus metrics, the abuse guard's bills) and its outputs routed to the per-HTTP-request
``GenerationStream`` queues. From an engine process, reports are read on the event loop itself when
their pipe is readable: a reader thread would have to win the interpreter lock from a busy event loop
for every report (up to a 5 ms switch interval each time) and hand the outputs back across threads.
From an engine thread, a reader thread applies them and hands the outputs over in one
``call_soon_threadsafe`` call. Only the engine loop touches the LLMEngine, so it needs no locks.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass

from joule.engine.request import RequestSLO
from joule.logger import get_logger
from joule.outputs import RequestOutput
from joule.sampling_params import RequestOutputKind, SamplingParams
from joule.server.engine_channels import EngineChannel, ThreadEngineChannel
from joule.server.generation_stream import GenerationStream
from joule.server.engine_loop import (
    STEP_FAILED,
    AbortCommand,
    AddCommand,
    EngineReport,
    EngineStats,
    StopCommand,
)

logger = get_logger()


class QueueFullError(Exception):
    """The waiting queue holds ``max_queue`` requests already; the client should retry later."""


class EngineStepError(Exception):
    """A model step raised; the requests it carried are failed, the engine keeps serving."""


class EngineStoppedError(Exception):
    """The engine is shutting down and accepts no more work."""


__all__ = ["AsyncEngine", "EngineStats", "EngineStepError", "EngineStoppedError", "GenerationStream",
           "QueueFullError"]


@dataclass
class _Route:
    stream: "GenerationStream"
    index: int
    num_samples: int = 1
    tenant: str | None = None
    prompt_tokens: int = 0
    generated_tokens: int = 0  # summed over the (DELTA) outputs seen so far
    energy_joules: float = 0.0  # the latest output's figure: joules so far
    first_token_handed_over: float | None = None  # time.time() when the first output went to the event loop

    def observe(self, output: RequestOutput) -> None:
        self.generated_tokens += sum(len(completion.token_ids) for completion in output.outputs)
        if output.metrics is not None and output.metrics.energy_joules is not None:
            self.energy_joules = max(self.energy_joules, output.metrics.energy_joules)


class AsyncEngine:
    """Serves ``engine``: an LLMEngine (or anything with its surface), run here on a thread, or an
    ``EngineChannel`` (a ``ProcessEngineChannel`` whose process runs one)."""

    def __init__(self, engine, metrics=None, max_queue: int | None = None, idle_poll_seconds: float = 0.5,
                 abuse_guard=None, request_log=None, step_log: str | None = None):
        """``abuse_guard`` (an AbuseGuard) is charged each request's tokens and joules as it ends;
        ``request_log`` (a ``RequestLog``) gets one line of timings per request that ends; ``step_log`` (a
        path) one line per step, written by an engine stepped here (a ``ProcessEngineChannel`` takes its own)."""
        if max_queue is not None and max_queue < 1:
            raise ValueError(f"max_queue must be a positive integer or None, got {max_queue}.")
        if isinstance(engine, EngineChannel):
            self.channel = engine
        else:
            self.channel = ThreadEngineChannel(engine, idle_poll_seconds, step_log=step_log)
        self.metrics = metrics
        self.abuse_guard = abuse_guard
        self.request_log = request_log
        self.max_queue = max_queue
        self._routes: dict[str, _Route] = {}  # the reader thread's, once a request is accepted
        self._accepting: dict[str, tuple[asyncio.Future, _Route]] = {}  # sent, not yet accepted or rejected
        self._stats = EngineStats()
        self._counted = EngineStats()  # the cumulative counters already added to the metrics
        self._pending_adds = 0  # touched on the event loop only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: threading.Thread | None = None
        self._reports_fd: int | None = None  # the pipe the event loop reads reports from, if it does
        self._started = False
        self._stopping = threading.Event()
        self._closed = threading.Event()

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self.channel.start()
        self._started = True
        fileno = getattr(self.channel, "reports_fileno", None)
        if fileno is not None:
            self._reports_fd = fileno()
            self._loop.add_reader(self._reports_fd, self._read_ready_reports)
            # uvloop (libuv) makes a polled descriptor non-blocking; a report is read whole once its
            # first bytes arrive, so the rest must be waited for, not failed with EAGAIN.
            os.set_blocking(self._reports_fd, True)
            return
        self._reader = threading.Thread(target=self._read_reports, name="joule-engine-reports", daemon=True)
        self._reader.start()

    @property
    def is_running(self) -> bool:
        return (self._started and not self._closed.is_set() and not self._stopping.is_set()
                and self.channel.is_alive())

    @property
    def num_in_flight(self) -> int:
        """Engine requests sent and not yet ended (waiting for acceptance, queued or running)."""
        return len(self._accepting) + len(self._routes)

    @property
    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine loop; requests still in flight are aborted and their streams told so."""
        self._stopping.set()
        self.channel.send(StopCommand())
        if self._reader is not None:
            self._reader.join(timeout)
        elif self._reports_fd is not None:
            self._closed.wait(timeout)  # the event loop reads the last report (this runs off the loop)
        self.channel.join(timeout)

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
            route = _Route(stream, index, params.n, tenant=tenant, prompt_tokens=len(prompt_ids))
            self._accepting[child_id] = (future, route)
            self.channel.send(AddCommand(child_id, prompt_ids, params, priority, tenant, slo, arrival))
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
        self.channel.send(AbortCommand(request_id))

    def _dispatch(self, settled: list[tuple[asyncio.Future, BaseException | None]],
                  deliveries: list[tuple[GenerationStream, int, RequestOutput | BaseException]]) -> None:
        for future, error in settled:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
        for stream, index, item in deliveries:
            stream._push(index, item)

    # -- reports read on the event loop (an engine process) ------------------------------------
    def _read_ready_reports(self) -> None:
        """Apply every report waiting in the pipe; the last one (or the pipe's end) stops the reading."""
        ended = False
        try:
            while self.channel.poll():
                report = self.channel.receive()
                self._apply_logged(report)
                if report.closed:
                    self._fail_everything(EngineStoppedError("the server is shutting down"))
                    ended = True
                    break
        except (EOFError, OSError):
            logger.error("the engine process has exited; failing the %d requests in flight", len(self._routes))
            self._fail_everything(EngineStepError("the engine process exited"))
            ended = True
        if ended:
            self._loop.remove_reader(self._reports_fd)
            self._closed.set()

    def _apply_logged(self, report: EngineReport) -> None:
        try:
            self._apply(report)
        except Exception:  # a bug here must not stop the reports of later steps
            logger.exception("could not apply an engine report")

    # -- the reader thread (an engine thread) --------------------------------------------------
    def _read_reports(self) -> None:
        while True:
            try:
                report = self.channel.receive()
            except (EOFError, OSError):
                logger.error("the engine process has exited; failing the %d requests in flight", len(self._routes))
                self._fail_everything(EngineStepError("the engine process exited"))
                break
            self._apply_logged(report)
            if report.closed:
                self._fail_everything(EngineStoppedError("the server is shutting down"))
                break
        self._closed.set()

    def _apply(self, report: EngineReport) -> None:
        settled: list[tuple[asyncio.Future, BaseException | None]] = []
        for request_id in report.accepted:
            future, route = self._accepting.pop(request_id)
            self._routes[request_id] = route
            settled.append((future, None))
        for request_id, message in report.rejected:
            future, _ = self._accepting.pop(request_id)
            settled.append((future, ValueError(message)))
        first_tokens, later_tokens = self._route_outputs(report.outputs)
        failures = self._route_aborts(report)
        self._publish_stats(report)
        if settled or first_tokens or later_tokens or failures:
            # First tokens go out first: a loaded event loop delays one more token of a running stream,
            # not a new request's time to first token.
            self._hand_over(settled, first_tokens + later_tokens + failures)

    def _route_outputs(self, outputs: list[RequestOutput]):
        now = time.time()
        first_tokens, later_tokens = [], []
        for output in outputs:
            route = self._routes.get(output.request_id)
            if route is None:
                continue
            if self.metrics is not None:
                self.metrics.on_output(output, now)
            first = route.generated_tokens == 0
            route.observe(output)
            if first:
                route.first_token_handed_over = now
            if output.finished:
                del self._routes[output.request_id]
                self._charge(route)
                if self.request_log is not None:
                    self.request_log.write(output, route, now)
            (first_tokens if first else later_tokens).append((route.stream, route.index, output))
        return first_tokens, later_tokens

    def _route_aborts(self, report: EngineReport) -> list:
        """Bill and count aborted requests; those the engine ended (a failed step, shutdown) get the error."""
        failures = []
        for aborted in report.aborted:
            route = self._routes.pop(aborted.request_id, None)
            if route is None:
                continue
            route.energy_joules = max(route.energy_joules, aborted.joules)
            if self.metrics is not None:
                self.metrics.on_abort(aborted.request_id, "abort" if aborted.reason == "abort" else "error",
                                      route.num_samples)
            self._charge(route)
            if self.request_log is not None:
                self.request_log.write_aborted(aborted.request_id, aborted.reason, route, report.time)
            if aborted.reason != "abort":
                message = report.error or "the engine stopped"
                error_type = EngineStepError if aborted.reason == STEP_FAILED else EngineStoppedError
                failures.append((route.stream, route.index, error_type(message)))
        return failures

    def _charge(self, route: _Route) -> None:
        """Bill a request that ended (finished or aborted) for what it used: prompt + generated, joules."""
        if self.abuse_guard is not None:
            self.abuse_guard.charge(self.abuse_guard.tenant_of(route.tenant),
                                    route.prompt_tokens + route.generated_tokens, route.energy_joules)

    def _fail_everything(self, error: BaseException) -> None:
        """The engine loop is gone: end every stream and every submit still waiting for an answer."""
        settled = [(future, error) for future, _ in self._accepting.values()]
        self._accepting.clear()
        deliveries = [(route.stream, route.index, error) for route in self._routes.values()]
        self._routes.clear()
        if (settled or deliveries) and self._loop is not None and not self._loop.is_closed():
            self._hand_over(settled, deliveries)

    def _hand_over(self, settled: list, deliveries: list) -> None:
        """To the event loop: directly when reports are read there, else from the reader thread."""
        if self._reports_fd is not None:
            self._dispatch(settled, deliveries)
        else:
            self._loop.call_soon_threadsafe(self._dispatch, settled, deliveries)

    def _publish_stats(self, report: EngineReport) -> None:
        stats, counted = report.stats, self._counted
        self._stats = stats
        if self.metrics is None:
            return
        self.metrics.set_engine_stats(stats)
        self.metrics.add_prefix_cache(stats.prefix_cache_queries - counted.prefix_cache_queries,
                                      stats.prefix_cache_hits - counted.prefix_cache_hits)
        self.metrics.add_preemptions(stats.num_preemptions - counted.num_preemptions)
        self._counted = stats
        if report.gc_pauses:
            self.metrics.on_gc_pauses("engine", report.gc_pauses)
        if report.energy_totals is not None:
            self.metrics.set_energy_totals(report.energy_totals, report.time)
