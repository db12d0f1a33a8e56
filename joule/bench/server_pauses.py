"""A Joule server's own pauses over a benchmark run, read from two scrapes of its /metrics.

A client-side latency tail can come from the server's scheduling, or from a server process that
stopped answering for a while: a garbage collection (``joule:gc_pause_seconds``, per process and
generation) or an event loop busy with other streams (``joule:event_loop_lag_seconds``). The
difference of two scrapes, taken before and after a run, says which pauses fell inside it.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

_FAMILIES = ("joule:gc_pause_seconds", "joule:event_loop_lag_seconds", "process_cpu_seconds")
_THRESHOLDS = ("0.01", "0.025", "0.05", "0.1")  # bucket bounds counted as "pauses over" in the summary

Counters = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_pause_counters(text: str) -> Counters:
    """The pause histograms' samples and the API process's CPU seconds, keyed by (sample, labels)."""
    counters: Counters = {}
    for family in text_string_to_metric_families(text):
        if family.name not in _FAMILIES:
            continue
        for sample in family.samples:
            labels = tuple(sorted((key, value) for key, value in sample.labels.items() if key != "model_name"))
            counters[(sample.name, labels)] = sample.value
    return counters


def scrape_pause_counters(base_url: str, timeout: float = 10.0) -> Counters:
    """The counters now, or {} from a server without them (not Joule, or unreachable)."""
    import httpx

    try:
        response = httpx.get(base_url.rstrip("/") + "/metrics", timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError:
        return {}
    return parse_pause_counters(response.text)


def _histogram(delta: Counters, name: str, labels: dict[str, str]) -> dict:
    def value(sample: str, extra: tuple[tuple[str, str], ...] = ()) -> float:
        key = tuple(sorted((*labels.items(), *extra)))
        return delta.get((name + sample, key), 0.0)

    count = value("_count")
    summary = {"count": int(count), "seconds": round(value("_sum"), 4)}
    for bound in _THRESHOLDS:
        summary[f"over_{float(bound) * 1000:g}ms"] = int(count - value("_bucket", (("le", bound),)))
    return summary


def summarize_pauses(before: Counters, after: Counters, wall_seconds: float) -> dict:
    """Pauses that fell between the two scrapes: event-loop lag and collections per process/generation,
    each as a count, total seconds and counts over 10/25/50/100 ms; the API process's CPU share."""
    if not any(name.startswith("joule:") for name, _ in after):
        return {}  # not a Joule server (vLLM's /metrics has process_cpu_seconds too)
    delta = {key: value - before.get(key, 0.0) for key, value in after.items()}
    summary: dict = {"event_loop_lag": _histogram(delta, "joule:event_loop_lag_seconds", {})}
    collections = sorted({dict(labels).get("process", "") + "/" + dict(labels).get("generation", "")
                          for name, labels in delta if name == "joule:gc_pause_seconds_count"})
    summary["gc"] = {}
    for key in collections:
        process, generation = key.split("/")
        gc_summary = _histogram(delta, "joule:gc_pause_seconds", {"process": process, "generation": generation})
        if gc_summary["count"]:
            summary["gc"][f"{process} gen{generation}"] = gc_summary
    cpu = delta.get(("process_cpu_seconds_total", ()))
    if cpu is not None and wall_seconds > 0:
        summary["api_cpu_share"] = round(cpu / wall_seconds, 3)
    return summary


def format_pauses(summary: dict) -> str:
    """One line: loop lag over 25/100 ms, the API's CPU share, the worst collections."""
    if not summary:
        return "no pause metrics"
    lag = summary["event_loop_lag"]
    parts = [f"loop lag >25ms {lag['over_25ms']} >100ms {lag['over_100ms']}"]
    if "api_cpu_share" in summary:
        parts.append(f"API CPU {100 * summary['api_cpu_share']:.0f}%")
    for key, gc_summary in summary["gc"].items():
        if gc_summary["over_10ms"]:
            parts.append(f"gc {key} {gc_summary['count']}x {gc_summary['seconds']:.3f}s "
                         f"(>50ms {gc_summary['over_50ms']})")
    return "; ".join(parts)
