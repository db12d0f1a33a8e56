"""Prometheus metrics with vLLM's names under the ``joule:`` prefix, on a per-app registry.

A per-app ``CollectorRegistry`` (not prometheus-client's global one) lets several servers live in
one process (tests) without clashing. Latency bookkeeping is updated only from the engine thread;
prometheus-client's metric objects are themselves thread-safe for the scrape.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from joule.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_JOULES_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0,
                             50.0, 100.0)
_PAUSE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_POWER_WINDOW_SECONDS = 60.0
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


_TOKEN_COUNT_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


@dataclass
class _RequestTiming:
    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    num_tokens: int = 0
    prompt_tokens: int = 0
    samples: int = 1  # n: completions seen (their indices)
    energy_counted: float = 0.0


class _PowerWindow:
    """Joules counted over the last ``window`` seconds, for an average power that follows the load."""

    def __init__(self, window: float = _POWER_WINDOW_SECONDS):
        self.window = window
        self.total = 0.0
        self._points: deque[tuple[float, float]] = deque()

    def add(self, now: float, joules: float) -> float | None:
        """Count ``joules`` at ``now``; returns the average watts over the window once it spans some time."""
        self.total += joules
        self._points.append((now, self.total))
        while len(self._points) > 2 and now - self._points[1][0] >= self.window:
            self._points.popleft()
        (first_time, first_total), (last_time, last_total) = self._points[0], self._points[-1]
        if last_time <= first_time:
            return None
        return (last_total - first_total) / (last_time - first_time)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total etc. of the API process
        labels = ["model_name"]
        self._model_name = model_name
        self._timings: dict[str, _RequestTiming] = {}

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.num_running = gauge("joule:num_requests_running", "Sequences running on the engine.")
        self.num_waiting = gauge("joule:num_requests_waiting", "Sequences waiting to be scheduled.")
        self.kv_usage = gauge("joule:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.")
        self.kv_blocks_used = gauge("joule:kv_cache_blocks_used", "KV cache blocks owned by requests.")
        self.kv_blocks_total = gauge("joule:kv_cache_blocks_total", "KV cache blocks in all.")
        self.prompt_tokens = counter("joule:prompt_tokens", "Prompt tokens of requests that started generating.")
        self.generation_tokens = counter("joule:generation_tokens", "Generated tokens.")
        self.prefix_queries = counter("joule:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("joule:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("joule:num_preemptions", "Preemptions of running requests.")
        self._finished = Counter(
            "joule:request_success", "Finished requests by finish reason.", ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.ttft = histogram("joule:time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("joule:inter_token_latency_seconds", "Time between output tokens.", _LATENCY_BUCKETS)
        self.e2e = histogram("joule:e2e_request_latency_seconds", "Arrival to finish.", _REQUEST_BUCKETS)
        self.queue_time = histogram("joule:request_queue_time_seconds", "Arrival to first scheduled.", _REQUEST_BUCKETS)
        # Per finished request, as vLLM's dashboards read them.
        self.request_tpot = histogram("joule:request_time_per_output_token_seconds",
                                      "A request's first to last token over its later tokens.", _LATENCY_BUCKETS)
        self.request_prefill = histogram("joule:request_prefill_time_seconds",
                                         "First scheduled to first token (the steps of its prompt).", _REQUEST_BUCKETS)
        self.request_decode = histogram("joule:request_decode_time_seconds", "First token to last token.",
                                        _REQUEST_BUCKETS)
        self.request_inference = histogram("joule:request_inference_time_seconds",
                                           "First scheduled to last token.", _REQUEST_BUCKETS)
        self.request_prompt_tokens = histogram("joule:request_prompt_tokens", "Prompt tokens of a finished request.",
                                               _TOKEN_COUNT_BUCKETS)
        self.request_generation_tokens = histogram("joule:request_generation_tokens",
                                                   "Tokens a finished request generated (all its samples).",
                                                   _TOKEN_COUNT_BUCKETS)
        energy_labels = ["model_name", "source"]  # source: measured (a hardware counter) or estimated
        self.energy_total = Counter(
            "joule:energy_joules", "Joules the engine's meter counted: charged to requests (finished or aborted) "
            "plus idle energy no request was present for.", energy_labels, registry=self.registry,
        )
        self.energy_unattributed = Counter(
            "joule:energy_unattributed_joules", "The part of joule:energy_joules counted while no request was "
            "present.", energy_labels, registry=self.registry,
        )
        self.energy_per_token = Histogram(
            "joule:energy_joules_per_output_token", "A finished request's joules divided by its output tokens.",
            energy_labels, buckets=_JOULES_PER_TOKEN_BUCKETS, registry=self.registry,
        )
        self.average_power = Gauge(
            "joule:average_power_watts", f"Metered joules per second over the last {_POWER_WINDOW_SECONDS:.0f} s.",
            energy_labels, registry=self.registry,
        )
        self.rejected = Counter(
            "joule_requests_rejected", "Requests refused with HTTP 429, by reason (tenant_token_budget, "
            "tenant_energy_budget, queue_full).", ["model_name", "reason"], registry=self.registry,
        )
        self.gc_pause = Histogram(
            "joule:gc_pause_seconds", "Pauses of the cyclic garbage collector, by server process (api, engine) and "
            "generation collected.", ["model_name", "process", "generation"], buckets=_PAUSE_BUCKETS,
            registry=self.registry,
        )
        self.event_loop_lag = histogram(
            "joule:event_loop_lag_seconds", "How late the API process's event loop woke a 10 ms timer: time it "
            "was busy (or paused) while requests and stream chunks waited.", _PAUSE_BUCKETS)
        self._power_windows: dict[str, _PowerWindow] = {}
        self._energy_seen: tuple[float, float] | None = None  # (metered, unattributed) already counted

    # -- engine thread -----------------------------------------------------------------------
    def set_engine_stats(self, stats) -> None:
        self.num_running.set(stats.num_running)
        self.num_waiting.set(stats.num_waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        self.kv_blocks_used.set(stats.num_used_blocks)
        self.kv_blocks_total.set(stats.num_blocks)

    def add_prefix_cache(self, queries: int, hits: int) -> None:
        if queries > 0:
            self.prefix_queries.inc(queries)
        if hits > 0:
            self.prefix_hits.inc(hits)

    def add_preemptions(self, count: int) -> None:
        if count > 0:
            self.preemptions.inc(count)

    def on_output(self, output: RequestOutput, now: float) -> None:
        """One delta output of a request: new tokens, first-token and per-token latencies, the end."""
        timing = self._timings.get(output.request_id)
        if timing is None:
            arrival = output.metrics.arrival_time if output.metrics is not None else now
            timing = self._timings[output.request_id] = _RequestTiming(arrival)
        new_tokens = sum(len(completion.token_ids) for completion in output.outputs)
        timing.num_tokens += new_tokens
        for completion in output.outputs:
            timing.samples = max(timing.samples, completion.index + 1)
        self._count_energy(output, timing)
        if new_tokens:
            self.generation_tokens.inc(new_tokens)
            if timing.last_token_time is None:
                self.ttft.observe(now - timing.arrival_time)
                timing.prompt_tokens = len(output.prompt_token_ids)
                self.prompt_tokens.inc(timing.prompt_tokens)
                timing.first_token_time = now
            else:
                self.itl.observe(now - timing.last_token_time)
            timing.last_token_time = now
        if output.finished:
            del self._timings[output.request_id]
            self.e2e.observe(now - timing.arrival_time)
            self._observe_finished(output, timing)
            for completion in output.outputs:
                if completion.finish_reason is not None:
                    self._finished.labels(self._model_name, completion.finish_reason).inc()

    def _observe_finished(self, output: RequestOutput, timing: _RequestTiming) -> None:
        """The per-request histograms: queue, prefill, decode and inference times (engine clock), lengths, TPOT."""
        metrics = output.metrics
        if metrics is not None:
            if metrics.time_in_queue is not None:
                self.queue_time.observe(metrics.time_in_queue)
            scheduled, first, last = metrics.first_scheduled_time, metrics.first_token_time, metrics.last_token_time
            if scheduled is not None and first is not None:
                self.request_prefill.observe(first - scheduled)
            if first is not None and last is not None:
                self.request_decode.observe(last - first)
            if scheduled is not None and last is not None:
                self.request_inference.observe(last - scheduled)
        if timing.last_token_time is None:  # ended before its first token: no lengths to report
            return
        self.request_prompt_tokens.observe(timing.prompt_tokens)
        self.request_generation_tokens.observe(timing.num_tokens)
        per_sample = timing.num_tokens / timing.samples
        if per_sample > 1:
            self.request_tpot.observe((timing.last_token_time - timing.first_token_time) / (per_sample - 1))

    def _count_energy(self, output: RequestOutput, timing: _RequestTiming) -> None:
        """Outputs carry a request's joules so far; a finished one adds its joules per output token."""
        metrics = output.metrics
        if metrics is None or metrics.energy_joules is None:
            return
        timing.energy_counted = max(timing.energy_counted, metrics.energy_joules)
        if output.finished and timing.num_tokens > 0:
            source = metrics.energy_source or "unknown"
            self.energy_per_token.labels(self._model_name, source).observe(timing.energy_counted / timing.num_tokens)

    def set_energy_totals(self, totals, now: float) -> None:
        """The ledger's books (an ``EnergyTotals``): count what the meter added since the last call.

        The first call sets the baseline, so a server counts the energy metered while it ran, all of
        it: finished and aborted requests' joules and the unattributed idle energy alike.
        """
        seen = (totals.metered_joules, totals.unattributed_joules)
        if self._energy_seen is None:
            self._energy_seen = seen
            return
        new_joules = max(0.0, seen[0] - self._energy_seen[0])
        new_unattributed = max(0.0, seen[1] - self._energy_seen[1])
        self._energy_seen = (max(seen[0], self._energy_seen[0]), max(seen[1], self._energy_seen[1]))
        source = totals.source or "unknown"
        if new_joules > 0:
            self.energy_total.labels(self._model_name, source).inc(new_joules)
        if new_unattributed > 0:
            self.energy_unattributed.labels(self._model_name, source).inc(new_unattributed)
        if new_joules > 0 or source in self._power_windows:
            window = self._power_windows.setdefault(source, _PowerWindow())
            watts = window.add(now, new_joules)
            if watts is not None:
                self.average_power.labels(self._model_name, source).set(watts)

    def on_abort(self, request_id: str, reason: str, num_samples: int = 1) -> None:
        """Counted per sample, like finishes, so n>1 requests weigh the same either way."""
        self._timings.pop(request_id, None)
        self._finished.labels(self._model_name, reason).inc(num_samples)

    def on_gc_pauses(self, process: str, pauses: list[tuple[int, float]]) -> None:
        for generation, seconds in pauses:
            self.gc_pause.labels(self._model_name, process, str(generation)).observe(seconds)

    # -- event loop -------------------------------------------------------------------------
    def on_event_loop_lag(self, seconds: float) -> None:
        self.event_loop_lag.observe(seconds)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self._model_name, reason).inc()

    # -- scrape ------------------------------------------------------------------------------
    def render(self) -> bytes:
        return generate_latest(self.registry)
