"""`joule serve`: flags and the entry point (wired into ``joule.cli`` by the lead).

Also runnable as ``python -m joule.server.cli`` so tests need nothing else.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import signal
import sys
import threading
from pathlib import Path

from joule.logger import get_logger
from joule.server.abuse_guard import DEFAULT_MAX_TOKENS_CAP, AbuseGuardConfig

logger = get_logger()


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    from joule.cli_args import add_engine_arguments

    add_engine_arguments(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="address to listen on")
    group.add_argument("--port", type=int, default=8000, help="port to listen on")
    group.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API routes")
    group.add_argument("--served-model-name", nargs="+", default=None,
                       help="name(s) clients use for the model (default: --model, or smollm2-135m)")
    group.add_argument("--max-queue", type=int, default=None,
                       help="most waiting requests before new ones get 429 (default: unbounded)")
    group.add_argument("--tenant-token-budget", type=int, default=None, metavar="N",
                       help="tokens (prompt + generated) per tenant per sliding minute; a tenant over it gets 429 "
                            "(tenant = the API's user field; requests without one share 'anonymous'; default: none)")
    group.add_argument("--tenant-energy-budget", type=float, default=None, metavar="J",
                       help="joules per tenant per sliding minute, as the engine attributes them (default: none)")
    group.add_argument("--max-tokens-cap", type=int, default=DEFAULT_MAX_TOKENS_CAP, metavar="N",
                       help=f"max_tokens for requests that omit it, and the most one may ask for (400 above it); "
                            f"0 = no cap (default: {DEFAULT_MAX_TOKENS_CAP})")
    group.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds to let in-flight requests finish after SIGTERM before aborting them")
    group.add_argument("--request-log", default=None, metavar="FILE",
                       help="append one JSON line of timings per request that ends (arrival, first scheduled, first "
                            "token, handed to the event loop, finished), to find where a slow request's time went")
    group.add_argument("--step-log", default=None, metavar="FILE",
                       help="append one JSON line per engine step (each sequence's new and cached tokens, wall time; "
                            ".gz: compressed), for `joule simulate --replay-log REQUESTS --step-log FILE`; costs the "
                            "engine loop ~0.1-0.5 ms a step at 256 sequences")
    group.add_argument("--chat-template", default=None, metavar="FILE_OR_TEXT",
                       help="a Jinja chat template (a file, or the template itself) used instead of the model's, "
                            "e.g. for a base model that ships none")
    group.add_argument("--reasoning-parser", choices=["deepseek_r1", "qwen3"], default=None,
                       help="put a reasoning model's <think> text in reasoning_content, apart from content")
    group.add_argument("--enable-auto-tool-choice", action="store_true",
                       help='let the model decide on tool calls (tool_choice "auto", the default with tools); '
                            "needs --tool-call-parser")
    group.add_argument("--tool-call-parser", choices=["hermes", "llama3_json"], default=None,
                       help="how replies name their tool calls: hermes (Qwen 2.5/3, Hermes: <tool_call> tags) or "
                            "llama3_json (Llama 3.1+: a JSON object)")
    group.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=True,
                       help="run the engine loop in a process of its own, so the HTTP event loop and the engine do "
                            "not share one interpreter lock (default); --no-engine-process keeps it on a thread")
    group.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                       help="uvicorn log level")


def _ready_message(host: str, port: int, model_name: str, api_key: str | None) -> str:
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host  # a wildcard bind is reached via loopback
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return (
        f"\nJoule is serving {model_name!r} at http://{host}:{port}/v1\n"
        f"  curl http://{host}:{port}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{{\"model\": \"{model_name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
        f"  python -c \"from openai import OpenAI; c = OpenAI(base_url='http://{host}:{port}/v1', "
        f"api_key='{api_key or 'EMPTY'}'); print(c.chat.completions.create(model='{model_name}', "
        f"messages=[{{'role': 'user', 'content': 'Hello!'}}]).choices[0].message.content)\"\n"
    )


def _graceful_server_class(ready_message: str):
    import uvicorn

    class GracefulServer(uvicorn.Server):
        """Prints how to call the server once it listens; exits 0 after a SIGTERM drain (uvicorn re-raises)."""

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(ready_message, flush=True)

        @contextlib.contextmanager
        def capture_signals(self):
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in originals.items():
                    signal.signal(sig, handler)

    return GracefulServer


def read_chat_template(value: str | None) -> str | None:
    """``--chat-template``: a file's text, or the value itself when it reads as a template (vLLM's rule)."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")


def abuse_guard_config_from_args(args: argparse.Namespace) -> AbuseGuardConfig:
    """The guard's budgets from ``joule serve`` flags (``--max-tokens-cap 0`` turns the cap off)."""
    if args.max_tokens_cap is not None and args.max_tokens_cap < 0:
        raise ValueError(f"max_tokens_cap must be 0 (no cap) or a positive integer, got {args.max_tokens_cap}.")
    return AbuseGuardConfig(
        tenant_token_budget=args.tenant_token_budget,
        tenant_energy_budget=args.tenant_energy_budget,
        max_tokens_cap=args.max_tokens_cap or None,
    )


def freeze_startup_heap() -> None:
    """Put what start-up left alive out of the cyclic collector's reach, for the life of the server.

    The model, the KV block table (one object per block: ~250k on an H200) and the imported modules make
    ~600k tracked objects that every full collection walks again: 228 ms per full collection on the CPU VM
    before, 0 ms after. Only the server does this: it holds one engine for its whole life, so nothing frozen
    becomes garbage.
    """
    gc.collect()
    gc.freeze()


# The API process's collector: a collection only once a million more container objects are alive than
# freed (CPython's default is 700); the cyclic garbage of finished requests is swept while nothing is in
# flight instead (``IdleCollector``). Nearly everything the API side allocates dies by reference counting,
# so collections find little, yet each one walks every waiting or streaming request's coroutines: with
# the default, ~160 ms full collections, 13 in a 30 s flood on the H200, set the light tenant's TTFT tail;
# with a 50,000 threshold, 5-6 young collections of 45-60 ms each still did (H200, 2026-12-04).
API_GC_THRESHOLDS = (1_000_000, 20, 100)


@contextlib.contextmanager
def startup_heap_frozen():
    """``freeze_startup_heap`` for the block, unfrozen after it: a heap left frozen is never freed at exit (the engine
    process's kept Triton's objects past its bindings, and nanobind printed "leaked instances" into every log)."""
    freeze_startup_heap()
    try:
        yield
    finally:
        gc.unfreeze()


@contextlib.contextmanager
def api_process_collector():
    """Freeze the start-up heap and raise the collector's thresholds for the life of the server."""
    previous = gc.get_threshold()
    with startup_heap_frozen():
        gc.set_threshold(*API_GC_THRESHOLDS)
        try:
            yield
        finally:
            gc.set_threshold(*previous)


def run_serve(args: argparse.Namespace) -> int:
    """Load the engine, serve until SIGTERM/SIGINT, and return 0 after a graceful shutdown."""
    import uvicorn

    from joule.cli_args import engine_config_from_args
    from joule.llm_engine import LLMEngine
    from joule.server.app import ServerConfig, build_app
    from joule.server.engine_channels import ProcessEngineChannel

    names = args.served_model_name or [args.model or "smollm2-135m"]
    if args.enable_auto_tool_choice and args.tool_call_parser is None:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (hermes or llama3_json)")
    server_config = ServerConfig(
        tool_call_parser=args.tool_call_parser if args.enable_auto_tool_choice else None,
        chat_template=read_chat_template(args.chat_template), reasoning_parser=args.reasoning_parser,
        served_model_names=names, api_key=args.api_key, max_queue=args.max_queue,
        shutdown_timeout_seconds=args.shutdown_timeout, abuse_guard=abuse_guard_config_from_args(args),
        request_log=args.request_log, step_log=args.step_log,
    )
    engine_config = engine_config_from_args(args)
    engine = (ProcessEngineChannel(engine_config, step_log=args.step_log) if args.engine_process
              else LLMEngine(engine_config))
    with api_process_collector():
        app = build_app(engine, server_config)
        uvicorn_config = uvicorn.Config(
            app, host=args.host, port=args.port, log_level=args.log_level,
            timeout_graceful_shutdown=max(1, int(args.shutdown_timeout)), access_log=False,
        )
        server = _graceful_server_class(_ready_message(args.host, args.port, names[0], args.api_key))(uvicorn_config)
        server.run()
    return 0 if server.started else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="joule serve", description="OpenAI-compatible server")
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_serve(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
