"""A server's request log replayed in the simulator: `joule simulate --replay-log FILE`.

`joule serve --request-log FILE` writes one line per request that ends (arrival, first token, finish, tenant,
prompt and generated tokens, prompt tokens the prefix cache served). Replaying it sends the simulator the very
same arrivals, tenants and lengths, so the simulated latencies can be set beside the logged ones for whatever
traffic a server really had, not only for a workload generated to match.

Prompts are random token ids of the logged lengths. A request that found ``cached_tokens`` of its prompt in the
prefix cache gets that many leading tokens from the latest earlier request long enough to lend them, so the
simulated cache can find them too (which earlier request really lent them is not logged). A request with several
samples (``n`` > 1) replays as one sequence generating all of their tokens. Requests the log shows aborted, or
without timings, are left out and counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from joule.perf.arrivals import SyntheticRequest, TimedRequest
from joule.perf.json_files import read_json_lines
from joule.perf.metrics import percentiles

_REQUIRED = ("arrival", "first_token", "finished", "prompt_tokens", "generated_tokens")


@dataclass
class RequestLog:
    records: list[dict]  # finished requests with timings, in arrival order
    skipped: int  # aborted or incomplete lines


def read_request_log(path: str | Path) -> RequestLog:
    """The finished requests of a request log (``.gz`` read compressed); a malformed line is an error naming it."""
    records, skipped = [], 0
    for _, record in read_json_lines(path):
        if any(record.get(key) is None for key in _REQUIRED) or record["generated_tokens"] < 1:
            skipped += 1
            continue
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no finished request with arrival, first_token and finished times")
    records.sort(key=lambda record: record["arrival"])
    return RequestLog(records, skipped)


def replay_requests(log: RequestLog, vocab_size: int, seed: int = 0) -> list[TimedRequest]:
    """The logged requests as the simulator's timed requests, arrivals counted from the first."""
    rng = random.Random(seed)
    start = log.records[0]["arrival"]
    requests, prompts = [], []
    for index, record in enumerate(log.records):
        length = int(record["prompt_tokens"])
        cached = min(int(record.get("cached_tokens") or 0), length)
        prefix: list[int] = []
        if cached:
            donor = next((prompt for prompt in reversed(prompts) if len(prompt) >= cached), None)
            prefix = donor[:cached] if donor is not None else []
        prompt = prefix + [rng.randrange(vocab_size) for _ in range(length - len(prefix))]
        prompts.append(prompt)
        tenant = record.get("tenant")
        requests.append(TimedRequest(f"{tenant or 'request'}-{index}", record["arrival"] - start,
                                     SyntheticRequest(prompt, int(record["generated_tokens"])), tenant=tenant))
    return requests


def logged_latencies(log: RequestLog) -> dict:
    """The log's own TTFT, TPOT and end-to-end percentiles (seconds), for all requests and per tenant, as the
    simulator's summary names them."""

    # Throughput over the whole log, per tenant too, as the simulator's summary counts it.
    span = max(r["finished"] for r in log.records) - log.records[0]["arrival"]

    def summary(records: list[dict]) -> dict:
        tokens = sum(r["generated_tokens"] for r in records)
        return {
            "num_requests": len(records),
            "output_throughput": tokens / span if span > 0 else float("nan"),
            "ttft_s": percentiles([r["first_token"] - r["arrival"] for r in records]),
            "tpot_s": percentiles([(r["finished"] - r["first_token"]) / (r["generated_tokens"] - 1)
                                   for r in records if r["generated_tokens"] > 1]),
            "e2e_s": percentiles([r["finished"] - r["arrival"] for r in records]),
        }

    result = summary(log.records)
    tenants = sorted({r.get("tenant") for r in log.records if r.get("tenant") is not None})
    if tenants:
        result["tenants"] = {name: summary([r for r in log.records if r.get("tenant") == name]) for name in tenants}
    return result


def comparison_lines(logged: dict, simulated: dict) -> list[str]:
    """Logged vs simulated, a line per metric for all requests and for each tenant."""
    lines = [f"{'':16}{'metric':<14}{'logged':>10}{'simulated':>11}{'error':>9}"]
    groups = [("all", logged, simulated)]
    groups += [(f"tenant {name}", logged["tenants"][name], simulated.get("tenants", {}).get(name, {}))
               for name in logged.get("tenants", {})]
    for label, measured, predicted in groups:
        for metric, key, point, scale in (("TTFT p50 ms", "ttft_s", "p50", 1e3), ("TTFT p90 ms", "ttft_s", "p90", 1e3),
                                          ("TPOT p50 ms", "tpot_s", "p50", 1e3), ("e2e p50 ms", "e2e_s", "p50", 1e3)):
            value = measured[key][point] * scale
            guess = predicted.get(key, {}).get(point, float("nan")) * scale
            error = (guess - value) / value if value else float("nan")
            lines.append(f"{label:<16}{metric:<14}{value:>10.1f}{guess:>11.1f}{error:>+9.1%}")
        guess = predicted.get("output_throughput", float("nan"))
        value = measured["output_throughput"]
        error = (guess - value) / value if value else float("nan")
        lines.append(f"{label:<16}{'output tok/s':<14}{value:>10.1f}{guess:>11.1f}{error:>+9.1%}")
    return lines


def prompt_work(steps_new_tokens: list[list[int]]) -> dict:
    """Prompt tokens a step carried, over the steps that carried any (a sequence computing more than one token is
    a prompt chunk): how many such steps, and the median, p90 and largest. Logged and simulated steps alike, to see
    whether a server ran other step shapes than its simulation."""
    per_step = [sum(tokens for tokens in step if tokens > 1) for step in steps_new_tokens]
    per_step = sorted(tokens for tokens in per_step if tokens)
    if not per_step:
        return {"steps": 0}
    return {"steps": len(per_step), "p50": per_step[len(per_step) // 2],
            "p90": per_step[min(len(per_step) - 1, int(0.9 * len(per_step)))], "max": per_step[-1]}
