"""The FastAPI app: routes, API-key check, and the engine loop's lifetime tied to the app's."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from joule.server.abuse_guard import AbuseGuard, AbuseGuardConfig
from joule.server.async_engine import AsyncEngine
from joule.server.errors import APIError, install_error_handlers
from joule.server.metrics import ServerMetrics
from joule.server.pause_monitor import EventLoopLagMonitor, GcPauseRecorder, IdleCollector
from joule.server.request_log import RequestLog
from joule.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from joule.server.responses import ModelCard, ModelList
from joule.server.serving_chat import create_chat_completion
from joule.server.serving_common import ServingContext
from joule.server.serving_completions import create_completion
from joule.server.serving_tokenize import detokenize, tokenize
from joule.server.reasoning import REASONING_PARSERS
from joule.server.tool_calls import TOOL_CALL_PARSERS

_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


@dataclass
class ServerConfig:
    """Options of ``joule serve`` beyond the engine's."""

    served_model_names: list[str] = field(default_factory=lambda: ["smollm2-135m"])
    api_key: str | None = None
    max_queue: int | None = None
    retry_after_seconds: int = 1
    shutdown_timeout_seconds: float = 10.0
    # Per-tenant token and joule budgets and the max_tokens cap (on by default: 4096).
    abuse_guard: AbuseGuardConfig = field(default_factory=AbuseGuardConfig)
    request_log: str | None = None  # a JSONL file: one line of timings per request that ends
    step_log: str | None = None  # one line per step (joule.perf.step_log), for an engine stepped on a thread
    tool_call_parser: str | None = None  # tool_choice "auto": hermes or llama3_json (None: auto is a 400)
    chat_template: str | None = None  # a template's text, used instead of the model's
    reasoning_parser: str | None = None  # deepseek_r1 or qwen3: <think> text goes to reasoning_content

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty strings, got {self.served_model_names!r}.")
        if self.max_queue is not None and (isinstance(self.max_queue, bool) or self.max_queue < 1):
            raise ValueError(f"max_queue must be a positive integer or None, got {self.max_queue!r}.")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty.")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}.")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}.")
        if not isinstance(self.abuse_guard, AbuseGuardConfig):
            raise ValueError(f"abuse_guard must be an AbuseGuardConfig, got {type(self.abuse_guard).__name__}.")


class APIKeyMiddleware:
    """Bearer-token check for the API routes; /health and /metrics stay open for probes and scrapes."""

    def __init__(self, app, api_key: str):
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(_PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        given = headers.get(b"authorization", b"")
        if not secrets.compare_digest(given, self._expected):
            reason = "missing" if not given else "invalid"
            error = APIError(401, f"{reason} API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


def build_app(engine, config: ServerConfig, clock: Callable[[], float] = time.monotonic) -> FastAPI:
    """An app serving ``engine``: an LLMEngine, stepped on a thread, or a ``ProcessEngineChannel``.

    The engine loop starts and stops with the app.
    ``clock`` times the abuse guard's budget windows (tests pass one they move by hand).
    """
    metrics = ServerMetrics(config.served_model_names[0])
    abuse_guard = AbuseGuard(config.abuse_guard, clock=clock)
    request_log = RequestLog(config.request_log) if config.request_log else None
    async_engine = AsyncEngine(engine, metrics=metrics, max_queue=config.max_queue, abuse_guard=abuse_guard,
                               request_log=request_log, step_log=config.step_log)
    info = async_engine.channel.info
    context = ServingContext(
        engine=async_engine,
        tokenizer=info.tokenizer,
        served_model_names=list(config.served_model_names),
        max_model_len=info.max_model_len,
        vocab_size=info.vocab_size,
        retry_after_seconds=config.retry_after_seconds,
        abuse_guard=abuse_guard,
        metrics=metrics,
        tool_call_parser=config.tool_call_parser,
        chat_template=config.chat_template,
        reasoning_parser=config.reasoning_parser,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        # In thread mode the engine shares this process, so its collections are counted as the API's.
        gc_pauses = GcPauseRecorder().install()
        monitor = EventLoopLagMonitor(metrics.on_event_loop_lag, gc_pauses=gc_pauses,
                                      observe_gc=lambda pauses: metrics.on_gc_pauses("api", pauses),
                                      idle_collector=IdleCollector(lambda: async_engine.num_in_flight == 0))
        async_engine.start(asyncio.get_running_loop())
        monitor.start()
        try:
            yield
        finally:
            await monitor.stop()
            gc_pauses.uninstall()
            await asyncio.to_thread(async_engine.shutdown, config.shutdown_timeout_seconds)
            if request_log is not None:
                request_log.close()

    app = FastAPI(title="Joule", lifespan=lifespan)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    app.state.abuse_guard = abuse_guard
    app.state.context = context
    install_error_handlers(app)
    if config.api_key is not None:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running:
            return APIError(503, "the engine is not running").response()
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        from joule import __version__

        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        root = info.model_path or None
        cards = [ModelCard(id=name, root=root, max_model_len=context.max_model_len)
                 for name in context.served_model_names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(context, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(context, body, request)

    @app.post("/tokenize")
    async def tokenize_route(body: TokenizeRequest) -> JSONResponse:
        return JSONResponse(tokenize(context, body).model_dump())

    @app.post("/detokenize")
    async def detokenize_route(body: DetokenizeRequest) -> JSONResponse:
        return JSONResponse(detokenize(context, body).model_dump())

    return app
