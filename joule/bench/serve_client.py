"""The HTTP side of `joule bench serve`: one streamed completion, /metrics energy counters, /tokenize.

Only OpenAI-compatible HTTP is spoken, so any such server can be measured; Joule's extras (``usage`` with
``energy_joules``, the ``joule:energy_joules_total`` counter, ``ttft_slo_ms`` / ``tpot_slo_ms``) are read or
sent when present and simply absent from the results otherwise.
"""

from __future__ import annotations

import json
import time

from joule.bench.serve_metrics import RequestResult
from joule.bench.serve_workload import PlannedRequest

ENERGY_COUNTER = "joule:energy_joules"
POWER_GAUGE = "joule:average_power_watts"


def request_payload(model: str, request: PlannedRequest, send_slo: bool) -> dict:
    """A streamed completion that generates exactly ``output_len`` tokens and asks for usage (with joules)."""
    payload = {"model": model, "prompt": request.prompt, "max_tokens": request.output_len, "temperature": 0.0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if request.tenant is not None:
        payload["user"] = request.tenant
    if send_slo:
        if request.slo.ttft_s is not None:
            payload["ttft_slo_ms"] = request.slo.ttft_s * 1000.0
        if request.slo.tpot_s is not None:
            payload["tpot_slo_ms"] = request.slo.tpot_s * 1000.0
    return payload


async def send_request(session, url: str, headers: dict, payload: dict, request: PlannedRequest) -> RequestResult:
    """Stream one completion and time it; failures are recorded in the result, never raised."""
    result = RequestResult(prompt_len=request.prompt_len, tenant=request.tenant, ttft_slo=request.slo.ttft_s,
                           tpot_slo=request.slo.tpot_s)
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
                _read_energy(event, result)
                usage = event.get("usage")
                if usage:
                    result.output_tokens = usage.get("completion_tokens") or 0
                    result.prompt_len = usage.get("prompt_tokens") or result.prompt_len
                    details = usage.get("prompt_tokens_details")
                    if isinstance(details, dict) and details.get("cached_tokens") is not None:
                        result.cached_tokens = int(details["cached_tokens"])
                    _read_energy(usage, result)
            result.latency = time.perf_counter() - started
            result.output_tokens = result.output_tokens or chunks
            result.success = chunks > 0
            if not result.success:
                result.error = "the stream carried no tokens"
    except Exception as error:  # a benchmark records failures and goes on
        result.error = f"{type(error).__name__}: {error}"
    return result


def _read_energy(fields: dict, result: RequestResult) -> None:
    """The usage chunk's (or final content chunk's) ``energy_joules``: the request's total so far."""
    joules = fields.get("energy_joules")
    if isinstance(joules, (int, float)):
        result.energy_joules = float(joules)
        result.energy_source = fields.get("energy_source") or result.energy_source


async def first_model(session, base_url: str, headers: dict) -> str:
    async with session.get(base_url + "/v1/models", headers=headers) as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


def parse_energy_metrics(text: str) -> dict | None:
    """Joule's energy counter (summed over labels) and power gauge from Prometheus text; None without them."""
    from prometheus_client.parser import text_string_to_metric_families

    joules = watts = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:  # matched by sample name: parsers differ on counters' family names
            if sample.name == ENERGY_COUNTER + "_total":
                joules = (joules or 0.0) + sample.value
            elif sample.name == POWER_GAUGE:
                watts = (watts or 0.0) + sample.value
    if joules is None:
        return None
    return {"energy_joules_total": joules, "average_power_watts": watts}


async def scrape_metrics(session, base_url: str, headers: dict) -> str | None:
    """The server's /metrics text, or None where it has none."""
    try:
        async with session.get(base_url + "/metrics", headers=headers) as response:
            if response.status != 200:
                return None
            return await response.text()
    except Exception:  # a server without /metrics simply has no counters to report
        return None


def parse_server_counters(text: str | None) -> tuple[dict | None, dict]:
    """(energy counters or None, pause counters) from a /metrics text; an unparsable one has neither."""
    from joule.bench.server_pauses import parse_pause_counters

    if text is None:
        return None, {}
    try:
        return parse_energy_metrics(text), parse_pause_counters(text)
    except Exception:  # not Prometheus text after all
        return None, {}


async def token_counter(session, base_url: str, headers: dict, model: str):
    """An async ``count(text)`` through the server's /tokenize, or None when the server has none."""

    async def count(text: str) -> int:
        body = {"model": model, "prompt": text, "add_special_tokens": True}
        async with session.post(base_url + "/tokenize", json=body, headers=headers) as response:
            response.raise_for_status()
            return int((await response.json())["count"])

    try:
        await count("hello")
    except Exception:  # no /tokenize: the caller falls back to word counts and says so
        return None
    return count
