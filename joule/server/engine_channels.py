"""Where the server's engine loop runs: on a thread of the API process, or in a process of its own.

Both channels carry the same messages (``joule.server.engine_loop``) and expose what the HTTP side
needs of the model (tokenizer, max_model_len, vocabulary size, path). ``joule serve`` uses the
process: one event loop writing hundreds of streams and an engine stepping every few milliseconds
then no longer share one interpreter lock, so neither waits on the other's Python work.
"""

from __future__ import annotations

import multiprocessing
import queue
import signal
import threading
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from joule.logger import get_logger
from joule.server.engine_loop import Command, EngineLoop, EngineReport, StopCommand
from joule.server.pause_monitor import GcPauseRecorder

logger = get_logger()


@dataclass
class EngineInfo:
    """What the API side needs of the loaded model, sent once by the engine process."""

    tokenizer: object | None
    max_model_len: int
    vocab_size: int
    model_path: str


@runtime_checkable
class EngineChannel(Protocol):
    """How the API side talks to the engine loop, wherever it runs."""

    info: EngineInfo

    def start(self) -> None: ...

    def send(self, command: Command) -> None: ...

    def receive(self) -> EngineReport: ...

    def is_alive(self) -> bool: ...

    def join(self, timeout: float) -> None: ...


class ThreadEngineChannel:
    """The engine loop on a thread beside the event loop (``build_app(engine)``, tests, embedding)."""

    def __init__(self, engine, idle_poll_seconds: float = 0.5, step_log: str | None = None):
        self.info = EngineInfo(engine.tokenizer, engine.max_model_len, engine.model_config.vocab_size,
                               str(getattr(engine, "model_path", "") or ""))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._reports: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = EngineLoop(engine, self._receive_command, self._reports.put, idle_poll_seconds,
                                step_log=step_log)
        self._thread: threading.Thread | None = None

    def _receive_command(self, timeout: float | None) -> Command:
        return self._commands.get_nowait() if timeout is None else self._commands.get(timeout=timeout)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop.run, name="joule-engine", daemon=True)
        self._thread.start()

    def send(self, command: Command) -> None:
        self._commands.put(command)

    def receive(self) -> EngineReport:
        return self._reports.get()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)


class EngineProcessError(RuntimeError):
    """The engine process could not load the model, or ended without saying why."""


class ProcessEngineChannel:
    """The engine loop in a child process (spawned, so CUDA starts fresh there) that loads the model.

    The constructor returns once the model is loaded, raising what loading raised (a ValueError or
    FileNotFoundError keeps its type, so ``joule serve`` reports it as a usage error). Commands and
    reports travel through pipes written and read on the API side's event loop: a multiprocessing
    queue's feeder thread would have to win the interpreter lock from the busy loop for every command,
    a new request's included. The command pipe is grown to 1 MiB where Linux allows, so the loop does
    not wait on a long step to write (~100 commands of 3,000-token prompts).
    """

    def __init__(self, config, idle_poll_seconds: float = 0.5, step_log: str | None = None):
        """``step_log``: a file the engine process writes one line per step to (``joule.perf.step_log``)."""
        context = multiprocessing.get_context("spawn")
        commands, self._commands = context.Pipe(duplex=False)
        self._reports, writer = context.Pipe(duplex=False)
        _grow_pipe(self._commands.fileno())
        self._send_lock = threading.Lock()  # the event loop and shutdown's thread both send
        self._process = context.Process(
            target=_engine_process_main, args=(config, commands, writer, idle_poll_seconds, step_log),
            name="joule-engine", daemon=True,
        )
        self._process.start()
        writer.close()  # the child holds the only writer: its exit ends our reads with EOFError
        commands.close()
        try:
            hello = self._reports.recv()
        except EOFError:
            self._process.join(5.0)
            raise EngineProcessError(
                f"the engine process exited while loading the model (exit code {self._process.exitcode})"
            ) from None
        if isinstance(hello, BaseException):
            self._process.join(5.0)
            raise hello
        self.info: EngineInfo = hello

    def start(self) -> None:
        """Already running since the constructor; here for the channel interface."""

    def send(self, command: Command) -> None:
        """Write ``command``; a gone process is reported by the reports' end, not here."""
        try:
            with self._send_lock:
                self._commands.send(command)
        except OSError:  # BrokenPipeError: the child has exited
            logger.warning("the engine process is gone; %s not delivered", type(command).__name__)

    def receive(self) -> EngineReport:
        """The next report; EOFError once the process has gone."""
        return self._reports.recv()

    def poll(self) -> bool:
        """Whether a report (or the pipe's end) can be read without waiting."""
        return self._reports.poll()

    def reports_fileno(self) -> int:
        """The reports pipe, for an event loop to read when it is readable (instead of a reader thread)."""
        return self._reports.fileno()

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def join(self, timeout: float) -> None:
        self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0f s; terminating it", timeout)
            self._process.terminate()
            self._process.join(5.0)
        with self._send_lock:
            self._commands.close()


def _grow_pipe(fileno: int, size: int = 1 << 20) -> None:
    """Best effort (Linux only, up to fs.pipe-max-size): a larger pipe buffer for commands."""
    try:
        import fcntl

        fcntl.fcntl(fileno, getattr(fcntl, "F_SETPIPE_SZ", 1031), size)
    except (ImportError, OSError):
        pass


def _engine_process_main(config, commands, reports, idle_poll_seconds: float, step_log: str | None = None) -> None:
    """The child: load the engine, say what the API side needs, run the loop until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us in order
    from joule.llm_engine import LLMEngine
    from joule.server.cli import startup_heap_frozen

    try:
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError) as error:
        reports.send(type(error)(str(error)))
        return
    except BaseException as error:
        logger.exception("the engine process could not load the model")
        reports.send(EngineProcessError(f"loading the model failed: {type(error).__name__}: {error}"))
        return
    with startup_heap_frozen():  # until the loop ends (joule/server/cli.py)
        _serve_commands(engine, commands, reports, idle_poll_seconds, step_log)


def _serve_commands(engine, commands, reports, idle_poll_seconds: float, step_log: str | None) -> None:
    """Say what the API side needs, then run the engine loop on the pipes until told to stop."""
    model_path = str(engine.model_path) if engine.model_path is not None else ""
    reports.send(EngineInfo(engine.tokenizer, engine.max_model_len, engine.model_config.vocab_size, model_path))
    parent = multiprocessing.parent_process()

    def receive(timeout: float | None) -> Command:
        try:
            if commands.poll(timeout or 0.0):
                return commands.recv()
        except (EOFError, OSError):  # the API side closed its end or died
            return StopCommand()
        if timeout is not None and parent is not None and not parent.is_alive():  # orphaned: stop
            return StopCommand()
        raise queue.Empty

    gc_pauses = GcPauseRecorder().install()
    try:
        EngineLoop(engine, receive, reports.send, idle_poll_seconds, gc_pauses=gc_pauses, step_log=step_log).run()
    except (BrokenPipeError, EOFError):
        pass  # the API side went away
    finally:
        gc_pauses.uninstall()
        reports.close()
