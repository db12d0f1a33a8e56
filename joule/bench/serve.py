"""`joule bench serve`: open-loop load against any OpenAI-compatible server (Joule, vLLM, ...).

Requests arrive as a Poisson process at ``--request-rate`` (``inf`` sends all at once), each a
streaming completion with ``ignore_eos`` so every request generates ``--output-len`` tokens. The
client only speaks HTTP, so the same command measures a vLLM server elsewhere.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from dataclasses import dataclass

from joule.bench.serve_metrics import RequestResult, compute_metrics, format_table

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
          "government company number group problem fact energy power light river stone cloud music garden "
          "market window letter engine signal forest winter summer city story answer").split()


@dataclass
class BenchRequest:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server root, without /v1")
    parser.add_argument("--endpoint", default="/v1/completions", help="completions endpoint path")
    parser.add_argument("--model", default=None, help="model name to send (default: the server's first model)")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key, if required")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--request-rate", type=float, default=float("inf"),
                        help="requests per second, Poisson arrivals; inf sends all at once")
    parser.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (words for random-text)")
    parser.add_argument("--output-len", type=int, default=64, help="tokens to generate (sent with ignore_eos)")
    parser.add_argument("--seed", type=int, default=0, help="seed for prompts and arrival times")
    parser.add_argument("--prompt-kind", choices=["token-ids", "random-text"], default="token-ids")
    parser.add_argument("--token-id-range", type=int, nargs=2, default=[1000, 10000], metavar=("LOW", "HIGH"),
                        help="token ids are drawn uniformly from [LOW, HIGH): valid for any vocab above HIGH")
    parser.add_argument("--percentiles", default="50,90,99", help="comma-separated latency percentiles")
    parser.add_argument("--no-warmup", action="store_true", help="skip the single warm-up request")
    parser.add_argument("--output-json", default=None, help="write the results here")


def build_workload(args: argparse.Namespace) -> list[BenchRequest]:
    """Seeded prompts: random token ids (exact length on any server) or random words."""
    rng = random.Random(args.seed)
    low, high = args.token_id_range
    if not 0 <= low < high:
        raise ValueError(f"token_id_range must satisfy 0 <= LOW < HIGH, got {low} {high}.")
    requests = []
    for _ in range(args.num_prompts):
        if args.prompt_kind == "token-ids":
            prompt: str | list[int] = [rng.randrange(low, high) for _ in range(args.input_len)]
        else:
            prompt = " ".join(rng.choice(_WORDS) for _ in range(args.input_len))
        requests.append(BenchRequest(prompt, args.input_len, args.output_len))
    return requests


def arrival_delays(num_requests: int, request_rate: float, seed: int) -> list[float]:
    """Seconds from the start at which each request is sent: Poisson, or all at 0 for an infinite rate."""
    if request_rate <= 0:
        raise ValueError(f"request_rate must be positive, got {request_rate}.")
    if request_rate == float("inf"):
        return [0.0] * num_requests
    rng = random.Random(seed + 1)
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


async def _send(session, url: str, headers: dict, payload: dict, request: BenchRequest) -> RequestResult:
    result = RequestResult(prompt_len=request.prompt_len)
    started = time.perf_counter()
    last = started
    try:
        async with session.post(url, json=payload, headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            chunks = 0
            async for raw in response.content:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line.removeprefix("data:").strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"].get("message"))
                    return result
                now = time.perf_counter()
                if event.get("choices"):
                    if chunks == 0:
                        result.ttft = now - started
                    else:
                        result.itl.append(now - last)
                    last = now
                    chunks += 1
                    result.generated_text += event["choices"][0].get("text") or ""
                if event.get("usage"):
                    result.output_tokens = event["usage"].get("completion_tokens") or 0
                    result.prompt_len = event["usage"].get("prompt_tokens") or result.prompt_len
            result.latency = time.perf_counter() - started
            result.output_tokens = result.output_tokens or chunks
            result.success = chunks > 0
            if not result.success:
                result.error = "the stream carried no tokens"
    except Exception as error:  # a benchmark records failures and goes on
        result.error = f"{type(error).__name__}: {error}"
    return result


async def _first_model(session, base_url: str, headers: dict) -> str:
    async with session.get(base_url + "/v1/models", headers=headers) as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def run_benchmark(args: argparse.Namespace) -> dict:
    import aiohttp

    base_url = args.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    workload = build_workload(args)
    delays = arrival_delays(len(workload), args.request_rate, args.seed)
    percentiles = [float(value) for value in args.percentiles.split(",") if value.strip()]
    timeout = aiohttp.ClientTimeout(total=6 * 3600)
    connector = aiohttp.TCPConnector(limit=args.max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        model = args.model or await _first_model(session, base_url, headers)
        url = base_url + args.endpoint

        def payload(request: BenchRequest) -> dict:
            return {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}

        if not args.no_warmup:
            warm = await _send(session, url, headers, payload(workload[0]), workload[0])
            if not warm.success:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        limit = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def scheduled(request: BenchRequest, delay: float) -> RequestResult:
            await asyncio.sleep(max(0.0, start + delay - time.perf_counter()))
            if limit is None:
                return await _send(session, url, headers, payload(request), request)
            async with limit:
                return await _send(session, url, headers, payload(request), request)

        start = time.perf_counter()
        results = await asyncio.gather(*(scheduled(r, d) for r, d in zip(workload, delays)))
        duration = time.perf_counter() - start
    metrics = compute_metrics(list(results), duration, percentiles)
    errors = sorted({result.error for result in results if not result.success})[:5]
    return {
        "config": {"base_url": base_url, "endpoint": args.endpoint, "model": model, "num_prompts": args.num_prompts,
                   "request_rate": args.request_rate, "max_concurrency": args.max_concurrency,
                   "input_len": args.input_len, "output_len": args.output_len, "seed": args.seed,
                   "prompt_kind": args.prompt_kind, "client_machine": platform.machine()},
        "metrics": metrics,
        "errors": errors,
    }


def run_serve_bench(args: argparse.Namespace) -> int:
    """Run the benchmark, print vLLM's table, write JSON; nonzero when any request failed."""
    for name in ("num_prompts", "input_len", "output_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(args, name)}.")
    report = asyncio.run(run_benchmark(args))
    metrics = report["metrics"]
    print(format_table(metrics, args.request_rate, args.max_concurrency))
    for error in report["errors"]:
        print(f"error: {error}", file=sys.stderr)
    if args.output_json:
        serializable = {**report, "metrics": metrics.to_dict(), "vllm_keys": metrics.to_vllm_keys()}
        serializable["config"]["request_rate"] = str(args.request_rate)
        with open(args.output_json, "w") as handle:
            json.dump(serializable, handle, indent=2)
    return 0 if metrics.failed == 0 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="joule bench serve", description=__doc__.splitlines()[0])
    add_serve_bench_arguments(parser)
    return run_serve_bench(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
