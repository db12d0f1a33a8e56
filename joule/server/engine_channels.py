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

    def __init__(self, engine, idle_poll_seconds: float = 0.5):
        self.info = EngineInfo(engine.tokenizer, engine.max_model_len, engine.model_config.vocab_size,
                               str(getattr(engine, "model_path", "") or ""))
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._reports: queue.SimpleQueue = queue.SimpleQueue()
        self._loop = EngineLoop(engine, self._receive_command, self._reports.put, idle_poll_seconds)
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
    FileNotFoundError keeps its type, so ``joule serve`` reports it as a usage error). Commands go
    through a multiprocessing queue, whose feeder thread keeps ``send`` from ever blocking the event
    loop; reports come back through a pipe that the API side reads on a thread of its own.
    """

    def __init__(self, config, idle_poll_seconds: float = 0.5):
        context = multiprocessing.get_context("spawn")
        self._commands = context.Queue()
        self._reports, writer = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_engine_process_main, args=(config, self._commands, writer, idle_poll_seconds),
            name="joule-engine", daemon=True,
        )
        self._process.start()
        writer.close()  # the child holds the only writer: its exit ends our reads with EOFError
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
        self._commands.put(command)

    def receive(self) -> EngineReport:
        """The next report; EOFError once the process has gone."""
        return self._reports.recv()

    def is_alive(self) -> bool:
        return self._process.is_alive()

    def join(self, timeout: float) -> None:
        self._process.join(timeout)
        if self._process.is_alive():
            logger.warning("the engine process did not stop within %.0f s; terminating it", timeout)
            self._process.terminate()
            self._process.join(5.0)
        self._commands.close()
        self._commands.join_thread()


def _engine_process_main(config, commands, reports, idle_poll_seconds: float) -> None:
    """The child: load the engine, say what the API side needs, run the loop until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which stops us in order
    from joule.llm_engine import LLMEngine
    from joule.server.cli import freeze_startup_heap

    try:
        engine = LLMEngine(config)
    except (ValueError, FileNotFoundError) as error:
        reports.send(type(error)(str(error)))
        return
    except BaseException as error:
        logger.exception("the engine process could not load the model")
        reports.send(EngineProcessError(f"loading the model failed: {type(error).__name__}: {error}"))
        return
    freeze_startup_heap()
    model_path = str(engine.model_path) if engine.model_path is not None else ""
    reports.send(EngineInfo(engine.tokenizer, engine.max_model_len, engine.model_config.vocab_size, model_path))
    parent = multiprocessing.parent_process()

    def receive(timeout: float | None) -> Command:
        if timeout is None:
            return commands.get_nowait()
        try:
            return commands.get(timeout=timeout)
        except queue.Empty:
            if parent is not None and not parent.is_alive():  # orphaned (the server was killed): stop
                return StopCommand()
            raise

    gc_pauses = GcPauseRecorder().install()
    try:
        EngineLoop(engine, receive, reports.send, idle_poll_seconds, gc_pauses=gc_pauses).run()
    except (BrokenPipeError, EOFError):
        pass  # the API side went away
    finally:
        gc_pauses.uninstall()
        reports.close()
