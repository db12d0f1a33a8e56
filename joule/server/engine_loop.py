"""The server's engine loop: commands in, one report per loop turn out, on a thread or in a process.

It owns the LLMEngine (or anything with its add/abort/step surface) and nothing of the HTTP side:
routes, streams, Prometheus metrics and the abuse guard stay with ``AsyncEngine`` in the API process.
Everything that crosses between the two is a small picklable message, so the same loop runs on a
thread beside the event loop (``build_app(engine)``) or in a process of its own (``joule serve``),
where the event loop's work on hundreds of streams cannot hold the engine's interpreter lock.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from joule.engine.request import RequestSLO
from joule.logger import get_logger
from joule.outputs import RequestOutput
from joule.sampling_params import SamplingParams
from joule.server.pause_monitor import GcPauseRecorder

logger = get_logger()

STEP_FAILED = "step-failed"
SHUTTING_DOWN = "shutting-down"


@dataclass(frozen=True)
class EngineStats:
    """A snapshot published after every loop turn, for gauges and admission."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_used_blocks: int = 0
    num_blocks: int = 0
    prefix_cache_queries: int = 0  # cumulative counters: the API side turns them into increments
    prefix_cache_hits: int = 0
    num_preemptions: int = 0


@dataclass
class AddCommand:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    tenant: str | None = None
    slo: RequestSLO | None = None
    arrival_time: float | None = None


@dataclass
class AbortCommand:
    request_id: str


@dataclass
class StopCommand:
    """Fail what is in flight, send the last report and end the loop."""


@dataclass
class Aborted:
    request_id: str
    joules: float  # all the request's attributed joules, released by the abort
    reason: str  # "abort" (the client asked) or one of STEP_FAILED / SHUTTING_DOWN


@dataclass
class EngineReport:
    """What one loop turn did, in the order the API side must apply it: accepts, outputs, aborts. A request's
    outputs after the one with its first tokens carry no ``prompt_token_ids``."""

    accepted: list[str] = field(default_factory=list)
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (request_id, the ValueError's message)
    outputs: list[RequestOutput] = field(default_factory=list)
    aborted: list[Aborted] = field(default_factory=list)
    error: str | None = None  # why the requests aborted with reason STEP_FAILED / SHUTTING_DOWN ended
    stats: EngineStats = field(default_factory=EngineStats)
    energy_totals: object | None = None  # the ledger's EnergyTotals, where the engine has a ledger
    gc_pauses: list[tuple[int, float]] = field(default_factory=list)  # the engine process's, since the last report
    closed: bool = False  # the loop has ended: no report follows
    time: float = 0.0  # time.time() when the stats were read

    @property
    def has_news(self) -> bool:
        return bool(self.accepted or self.rejected or self.outputs or self.aborted or self.closed)


Command = AddCommand | AbortCommand | StopCommand


class EngineLoop:
    """Steps ``engine`` while it has work, applying the commands that arrived between steps.

    ``receive(timeout)`` returns the next command or raises ``queue.Empty`` (``timeout=None`` never
    waits); ``send(report)`` hands a report to the API side. Only this loop touches the engine.
    ``gc_pauses`` (in a process of its own) records the collector's pauses for the reports.
    """

    def __init__(self, engine, receive: Callable[[float | None], Command], send: Callable[[EngineReport], None],
                 idle_poll_seconds: float = 0.5, gc_pauses: GcPauseRecorder | None = None,
                 step_log: str | None = None):
        """``step_log``: a file for one line per step (``joule.perf.step_log``), opened where the loop runs."""
        self.engine = engine
        self._step_log_path = step_log
        self._step_recorder = None
        self._gc_pauses = gc_pauses
        self._receive = receive
        self._send = send
        self._idle_poll_seconds = idle_poll_seconds
        self._live: set[str] = set()  # request ids added and not yet finished or aborted
        # Live requests whose prompt token ids went out with their first tokens: their later outputs carry
        # none. Every report is pickled to the API process, and 256 streams' prompts of 300 tokens made a
        # step's report 206 KiB instead of 45 (1.4 + 1.8 ms to pickle and unpickle instead of 0.6 + 0.8).
        self._prompt_sent: set[str] = set()

    def run(self) -> None:
        if self._step_log_path is not None:
            from joule.perf.step_log import StepRecorder

            self._step_recorder = StepRecorder(self.engine, self._step_log_path)
        try:
            self._run()
        finally:
            if self._step_recorder is not None:
                self._step_recorder.close()

    def _run(self) -> None:
        self._send(self._report(EngineReport()))  # the first stats, before any request
        stopping = False
        while not stopping:
            report = EngineReport()
            stepped = False
            try:
                idle = not self.engine.has_unfinished_requests()
                stopping = self._apply_commands(report, block=idle)
                if not stopping and self.engine.has_unfinished_requests():
                    stepped = True
                    self._step(report, after_idle=idle)
            except Exception as error:  # a bug outside step(): fail what is in flight, keep serving
                logger.exception("engine loop error")
                self._fail_all(report, STEP_FAILED, f"engine error: {type(error).__name__}")
            if stopping:
                self._fail_all(report, SHUTTING_DOWN, "the server is shutting down")
                report.closed = True
            if report.has_news or stepped:  # a step without outputs (a prompt chunk) still moves the stats
                self._send(self._report(report))

    def _apply_commands(self, report: EngineReport, block: bool) -> bool:
        """Apply every command waiting (waiting for one first if ``block``); True once told to stop."""
        timeout = self._idle_poll_seconds if block else None
        while True:
            try:
                command = self._receive(timeout)
            except queue.Empty:
                return False
            timeout = None
            if isinstance(command, AddCommand):
                self._add(command, report)
            elif isinstance(command, AbortCommand):
                self._abort(command.request_id, "abort", report)
            else:
                return True

    def _add(self, command: AddCommand, report: EngineReport) -> None:
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
            report.rejected.append((command.request_id, str(error)))
            return
        self._live.add(command.request_id)
        report.accepted.append(command.request_id)

    def _abort(self, request_id: str, reason: str, report: EngineReport) -> None:
        if request_id not in self._live:
            return
        self._live.discard(request_id)
        self._prompt_sent.discard(request_id)
        ledger = getattr(self.engine, "energy_ledger", None)
        released_before = ledger.released_joules if ledger is not None else 0.0
        try:
            self.engine.abort_request(request_id)
        finally:
            joules = ledger.released_joules - released_before if ledger is not None else 0.0
            report.aborted.append(Aborted(request_id, joules, reason))

    def _step(self, report: EngineReport, after_idle: bool = False) -> None:
        started, clock = time.time(), time.perf_counter()
        try:
            outputs = self.engine.step()
        except Exception as error:
            logger.exception("engine step failed; failing the %d requests in flight", len(self._live))
            self._fail_all(report, STEP_FAILED, f"the engine failed while generating: {type(error).__name__}")
            return
        if self._step_recorder is not None:
            self._step_recorder.write(outputs, started, time.perf_counter() - clock, after_idle)
        prompt_sent = self._prompt_sent
        for output in outputs:
            request_id = output.request_id
            if request_id in prompt_sent:
                output.prompt_token_ids = []  # the API side counted them with the first tokens (metrics)
            elif any(completion.token_ids for completion in output.outputs):
                prompt_sent.add(request_id)
            if output.finished:
                self._live.discard(request_id)
                prompt_sent.discard(request_id)
        report.outputs.extend(outputs)

    def _fail_all(self, report: EngineReport, reason: str, message: str) -> None:
        report.error = message
        for request_id in list(self._live):
            try:
                self._abort(request_id, reason, report)
            except Exception:
                logger.exception("could not abort request %s", request_id)

    def _report(self, report: EngineReport) -> EngineReport:
        scheduler = self.engine.core.scheduler
        blocks = self.engine.block_manager
        report.stats = EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=blocks.usage,
            num_used_blocks=blocks.num_used_blocks,
            num_blocks=blocks.num_blocks,
            prefix_cache_queries=blocks.prefix_cache_queries,
            prefix_cache_hits=blocks.prefix_cache_hits,
            num_preemptions=scheduler.num_preemptions,
        )
        ledger = getattr(self.engine, "energy_ledger", None)
        if ledger is not None:  # read here, on the loop: the ledger is not thread-safe
            report.energy_totals = ledger.totals()
        if self._gc_pauses is not None:
            report.gc_pauses = self._gc_pauses.drain()
        report.time = time.time()
        return report
