"""The benchmark's reading of a server's pauses: two scrapes of /metrics, differenced."""

from __future__ import annotations

from joule.bench.server_pauses import format_pauses, parse_pause_counters, summarize_pauses
from joule.server.metrics import ServerMetrics


def test_only_the_pauses_between_the_two_scrapes_are_summarized():
    metrics = ServerMetrics("m")
    metrics.on_gc_pauses("api", [(2, 0.3)])  # before the run: not counted
    metrics.on_event_loop_lag(0.2)
    before = parse_pause_counters(metrics.render().decode())
    metrics.on_gc_pauses("api", [(0, 0.001), (0, 0.002), (2, 0.06)])
    metrics.on_gc_pauses("engine", [(2, 0.12)])
    for lag in (0.0005, 0.03, 0.15):
        metrics.on_event_loop_lag(lag)
    summary = summarize_pauses(before, parse_pause_counters(metrics.render().decode()), wall_seconds=2.0)
    lag = summary["event_loop_lag"]
    assert lag["count"] == 3 and lag["over_25ms"] == 2 and lag["over_100ms"] == 1
    assert abs(lag["seconds"] - 0.1805) < 1e-9
    assert summary["gc"]["api gen0"] == {"count": 2, "seconds": 0.003, "over_10ms": 0, "over_25ms": 0,
                                         "over_50ms": 0, "over_100ms": 0}
    assert summary["gc"]["api gen2"]["count"] == 1 and summary["gc"]["api gen2"]["over_50ms"] == 1
    assert summary["gc"]["engine gen2"]["over_100ms"] == 1
    assert 0 <= summary["api_cpu_share"] < 10
    line = format_pauses(summary)
    assert "loop lag >25ms 2 >100ms 1" in line and "gc engine gen2 1x 0.120s (>50ms 1)" in line
    assert "api gen0" not in line  # collections that all stayed under 10 ms are left out of the line


def test_a_server_without_the_metrics_gives_an_empty_summary():
    assert summarize_pauses({}, {}, 1.0) == {} and format_pauses({}) == "no pause metrics"


def test_another_servers_metrics_are_not_read_as_pauses():
    vllm_like = "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n"
    assert summarize_pauses({}, parse_pause_counters(vllm_like), 1.0) == {}
