"""`joule serve --request-log FILE`: one JSON line of timings per request that ends.

Where a request's time went, for a user chasing a latency outlier: ``arrival`` (the API process handed
it to the engine, after tokenization), ``first_scheduled`` and ``first_token`` (the engine's clock,
same ``time.time()`` base), ``first_token_handed_over`` (the API process had the first output and gave
it to the event loop to write) and ``finished``. A client's TTFT minus ``first_token_handed_over -
arrival`` is the HTTP side: reading and tokenizing the request, writing the chunk, the network.
`joule simulate --replay-log FILE` sends the logged traffic through the simulator (``joule.perf.log_replay``).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

from joule.outputs import RequestOutput


class RequestLog:
    """Appends lines to ``path``; safe to call from the engine-report thread while the loop runs."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115  (closed in close())
        self._lock = threading.Lock()

    def write(self, output: RequestOutput, route, now: float) -> None:
        metrics = output.metrics
        record = {
            "request_id": output.request_id,
            "tenant": route.tenant,
            "prompt_tokens": route.prompt_tokens,
            "cached_tokens": output.num_cached_tokens,  # of the prompt, served by the prefix cache
            "generated_tokens": route.generated_tokens,
            "finish_reason": output.outputs[0].finish_reason if output.outputs else None,
            "arrival": metrics.arrival_time if metrics is not None else None,
            "first_scheduled": metrics.first_scheduled_time if metrics is not None else None,
            "first_token": metrics.first_token_time if metrics is not None else None,
            "first_token_handed_over": route.first_token_handed_over,
            "finished": now,
            "num_preemptions": metrics.num_preemptions if metrics is not None else 0,
            "energy_joules": route.energy_joules,
        }
        self._write(record)

    def write_aborted(self, request_id: str, reason: str, route, now: float) -> None:
        self._write({"request_id": request_id, "tenant": route.tenant, "prompt_tokens": route.prompt_tokens,
                     "generated_tokens": route.generated_tokens, "finish_reason": reason,
                     "first_token_handed_over": route.first_token_handed_over, "finished": now,
                     "energy_joules": route.energy_joules})

    def _write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        with self._lock:
            if not self._file.closed:
                self._file.write(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()
