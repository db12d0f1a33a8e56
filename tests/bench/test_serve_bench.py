"""`joule bench serve`: vLLM's metric definitions, goodput, energy, plots, and sweeps against a live tiny server."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest
from server.conftest import live_server, tiny_model_dir  # noqa: F401  (fixtures)

from joule.bench.serve import (
    RunResult,
    SweepReport,
    add_serve_bench_arguments,
    config_from_args,
    run_serve_bench,
)
from joule.bench.serve_client import parse_energy_metrics, request_payload
from joule.bench.serve_metrics import RequestResult, compute_metrics, format_table
from joule.bench.serve_plots import plot_sweeps
from joule.bench.serve_workload import PlannedRequest
from joule.perf.metrics import SLO


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_bench_arguments(parser)
    return parser.parse_args(list(argv))


def _done(ttft, latency, tokens, tenant=None, ttft_slo=None, tpot_slo=None, joules=None) -> RequestResult:
    return RequestResult(success=True, prompt_len=10, output_tokens=tokens, ttft=ttft, latency=latency,
                         itl=[(latency - ttft) / max(tokens - 1, 1)] * (tokens - 1), tenant=tenant,
                         ttft_slo=ttft_slo, tpot_slo=tpot_slo, energy_joules=joules,
                         energy_source=None if joules is None else "estimated")


def test_metrics_follow_vllm_definitions():
    results = [
        RequestResult(success=True, prompt_len=10, output_tokens=3, ttft=0.1, latency=0.5, itl=[0.2, 0.2]),
        RequestResult(success=True, prompt_len=10, output_tokens=5, ttft=0.3, latency=0.7, itl=[0.1] * 4),
        RequestResult(success=False, prompt_len=10, error="HTTP 500"),
    ]
    metrics = compute_metrics(results, duration_s=2.0, percentiles=[50, 99])
    assert (metrics.completed, metrics.failed) == (2, 1)
    assert metrics.total_input_tokens == 20 and metrics.total_output_tokens == 8
    assert metrics.request_throughput == pytest.approx(1.0)
    assert metrics.output_throughput == pytest.approx(4.0)
    assert metrics.total_token_throughput == pytest.approx(14.0)
    assert metrics.ttft_ms.mean == pytest.approx(200.0)
    assert metrics.tpot_ms.mean == pytest.approx(150.0)  # (latency - ttft) / (tokens - 1): 200 ms and 100 ms
    assert metrics.itl_ms.mean == pytest.approx(1000 * statistics.mean([0.2, 0.2, 0.1, 0.1, 0.1, 0.1]))
    assert metrics.e2el_ms.percentiles["p50"] == pytest.approx(600.0)
    assert metrics.goodput is None and metrics.slo_attainment is None  # no SLOs: no goodput
    assert metrics.energy_joules is None and metrics.joules_per_output_token is None  # none reported: none invented
    table = format_table(metrics, float("inf"), None)
    flat = metrics.to_vllm_keys()
    assert flat["mean_tpot_ms"] == pytest.approx(150.0) and flat["p99_e2el_ms"] == metrics.e2el_ms.percentiles["p99"]
    assert flat["completed"] == 2 and flat["duration"] == 2.0
    assert "Mean TTFT (ms)" in table and "P99 ITL (ms)" in table and "none reported" in table


def test_goodput_counts_completed_requests_meeting_all_their_slos():
    results = [
        _done(0.2, 1.2, 11, ttft_slo=0.5, tpot_slo=0.15, joules=2.0),  # TPOT 0.1: good
        _done(0.9, 1.9, 11, ttft_slo=0.5, tpot_slo=0.15, joules=3.0),  # TTFT misses
        _done(0.1, 2.1, 11, ttft_slo=0.5, tpot_slo=0.15),  # TPOT 0.2 misses; no energy reported
        _done(0.1, 0.1, 1, ttft_slo=0.5, tpot_slo=0.15, joules=1.0),  # one token: TPOT trivially met
        _done(5.0, 9.0, 5),  # carries no SLO: good once completed
        RequestResult(success=False, ttft_slo=0.5, error="HTTP 429"),  # failed: never good
    ]
    metrics = compute_metrics(results, duration_s=4.0, percentiles=[50])
    assert metrics.goodput == pytest.approx(3 / 4.0)
    assert metrics.slo_attainment == pytest.approx(3 / 6)
    assert metrics.energy_joules == pytest.approx(6.0) and metrics.requests_with_energy == 3
    assert metrics.joules_per_request == pytest.approx(2.0)
    assert metrics.joules_per_output_token == pytest.approx(6.0 / 23)  # only requests that reported joules
    assert metrics.energy_source == "estimated" and metrics.to_vllm_keys()["request_goodput"] == 0.75


def test_payload_carries_tenant_and_slo_fields_only_when_asked():
    planned = PlannedRequest("light", 0.0, [5, 6], 2, 3, SLO(0.5, 0.04))
    payload = request_payload("m", planned, send_slo=True)
    assert payload["user"] == "light" and payload["ttft_slo_ms"] == 500.0 and payload["tpot_slo_ms"] == 40.0
    assert payload["stream_options"] == {"include_usage": True} and payload["max_tokens"] == 3
    quiet = request_payload("m", PlannedRequest(None, 0.0, "hi", 1, 3, SLO(0.5)), send_slo=False)
    assert not {"user", "ttft_slo_ms", "tpot_slo_ms"} & set(quiet)


def test_energy_counters_are_read_from_prometheus_text():
    text = ('# HELP joule:energy_joules Joules.\n# TYPE joule:energy_joules counter\n'
            'joule:energy_joules_total{model_name="m",source="measured"} 12.5\n'
            'joule:energy_joules_total{model_name="m",source="estimated"} 0.5\n'
            '# HELP joule:average_power_watts W.\n# TYPE joule:average_power_watts gauge\n'
            'joule:average_power_watts{model_name="m",source="measured"} 150.0\n')
    assert parse_energy_metrics(text) == {"energy_joules_total": 13.0, "average_power_watts": 150.0}
    assert parse_energy_metrics("# TYPE other counter\nother_total 3\n") is None


def test_plots_are_written_for_one_or_several_sweeps(tmp_path):
    def sweep(scale: float, joules: float | None) -> SweepReport:
        runs = []
        for rate in (1.0, 4.0, float("inf")):
            results = [_done(0.05 * scale * i, 0.5 * scale * i, 8, ttft_slo=0.3, tpot_slo=0.07, joules=joules)
                       for i in range(1, 6)]
            runs.append(RunResult(rate, compute_metrics(results, 3.0, [50, 99]), {}, results, None, []))
        return SweepReport({}, runs)

    paths = plot_sweeps({"chunked": sweep(1.0, 0.4), "prefill-first": sweep(2.0, None)}, tmp_path / "plots", "t")
    assert sorted(p.name for p in paths) == ["energy_vs_rate.png", "goodput_vs_rate.png", "latency_cdfs.png",
                                             "latency_vs_rate.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" and p.stat().st_size > 5000 for p in paths)


def test_bad_options_raise_clear_errors():
    with pytest.raises(ValueError, match="input=/output="):
        config_from_args(_args("--dataset", "x.json", "--tenant", "a:input=64"))
    with pytest.raises(ValueError, match="request rate"):
        config_from_args(_args("--request-rate", "1,fast"))
    with pytest.raises(ValueError, match="burstiness"):
        config_from_args(_args("--arrival", "gamma", "--burstiness", "0"))


def test_a_sweep_with_tenants_slos_and_plots_against_a_live_server(live_server, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "bench.json"
    args = _args("--base-url", live_server.base_url, "--num-prompts", "6", "--request-rate", "20,inf",
                 "--arrival", "gamma", "--burstiness", "2", "--input-len", "uniform:8:24", "--output-len", "5",
                 "--tenant", "light:rate=10,ttft=30,tpot=10", "--tenant", "heavy:share=1,input=32,num=4",
                 "--slo", "tpot=20", "--output-json", str(output), "--plot-dir", str(tmp_path / "plots"))
    assert run_serve_bench(args) == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and printed.rstrip().splitlines()[-1].startswith("(latencies")
    assert printed.count("server pauses: loop lag >25ms") == 2  # a Joule server: its pauses during each run
    report = json.loads(output.read_text())
    assert report["config"]["model"] == "tiny" and report["config"]["send_slo"] is True
    assert [run["request_rate"] for run in report["runs"]] == ["20", "inf"]
    for run in report["runs"]:
        metrics, tenants = run["metrics"], run["tenants"]
        assert metrics["failed"] == 0 and metrics["completed"] == sum(t["completed"] for t in tenants.values())
        assert tenants["heavy"]["completed"] == 4 and tenants["heavy"]["total_input_tokens"] == 4 * 32
        assert metrics["total_output_tokens"] == 5 * metrics["completed"]  # ignore_eos: exactly output_len each
        assert 0 < metrics["ttft_ms"]["mean"] <= metrics["e2el_ms"]["mean"]
        assert metrics["goodput"] == pytest.approx(metrics["completed"] / metrics["duration_s"])  # generous SLOs
        assert metrics["slo_attainment"] == 1.0
        # the tiny CPU server estimates joules and reports them per request and in /metrics
        assert metrics["requests_with_energy"] == metrics["completed"] and metrics["joules_per_output_token"] > 0
        assert metrics["energy_source"] == "estimated"
        assert run["server_energy"]["delta_joules"] > 0
        assert run["server_pauses"]["event_loop_lag"]["count"] > 0 and run["server_pauses"]["api_cpu_share"] > 0
        assert {r["tenant"] for r in run["requests"]} == {"light", "heavy"}
    assert len(list((tmp_path / "plots").glob("*.png"))) == 4


def test_sharegpt_dataset_is_tokenized_by_the_server(live_server, tmp_path):  # noqa: F811
    dataset = tmp_path / "sharegpt.json"
    dataset.write_text(json.dumps([{"conversations": [{"from": "human", "value": f"Tell me about rivers {i}."},
                                                      {"from": "gpt", "value": "Rivers flow to the sea."}]}
                                   for i in range(3)]))
    output = tmp_path / "b.json"
    args = _args("--base-url", live_server.base_url, "--num-prompts", "3", "--dataset", str(dataset),
                 "--no-warmup", "--output-json", str(output))
    assert run_serve_bench(args) == 0
    report = json.loads(output.read_text())
    assert report["config"]["dataset_lengths"].startswith("tokens")
    metrics = report["runs"][0]["metrics"]
    assert metrics["completed"] == 3
    assert 3 < metrics["total_output_tokens"] / 3 < 12  # the reply's token count, not a default length


def test_prompts_behind_a_shared_prefix_report_the_servers_prefix_cache_hits(live_server, tmp_path):  # noqa: F811
    """Requests 100 ms apart behind one 48-token prefix: after the first, the server serves the prefix's whole
    blocks from its cache, and the run reports the share of prompt tokens it did (from each response's usage)."""
    output = tmp_path / "b.json"
    args = _args("--base-url", live_server.base_url, "--num-prompts", "5", "--request-rate", "10",
                 "--arrival", "fixed", "--input-len", "8", "--output-len", "2", "--shared-prefix-len", "48",
                 "--token-id-range", "5", "200", "--no-warmup", "--seed", "9", "--output-json", str(output))
    assert run_serve_bench(args) == 0
    run = json.loads(output.read_text())["runs"][0]
    assert run["metrics"]["total_input_tokens"] == 5 * 56
    assert all(request["cached_tokens"] is not None for request in run["requests"])
    hits = sorted(request["cached_tokens"] for request in run["requests"])
    assert hits[0] == 0 and all(32 <= hit < 56 for hit in hits[1:])  # whole blocks of the prefix, never the last
    assert run["metrics"]["prefix_cache_hit_rate"] == pytest.approx(sum(hits) / (5 * 56))


def test_failures_are_counted_and_the_exit_code_says_so(live_server, tmp_path):  # noqa: F811
    args = _args("--base-url", live_server.base_url, "--num-prompts", "2", "--input-len", "600",
                 "--output-len", "5", "--no-warmup", "--output-json", str(tmp_path / "b.json"))
    assert run_serve_bench(args) == 1
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["runs"][0]["metrics"]["failed"] == 2 and "400" in report["runs"][0]["errors"][0]
