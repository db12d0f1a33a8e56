"""`joule bench serve`: vLLM's metric definitions, Poisson arrivals, and a run against a live tiny server."""

from __future__ import annotations

import argparse
import json
import statistics

import pytest

from joule.bench.serve import add_serve_bench_arguments, arrival_delays, build_workload, run_serve_bench
from joule.bench.serve_metrics import RequestResult, compute_metrics, format_table
from server.conftest import live_server, tiny_model_dir  # noqa: F401  (fixtures)


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_bench_arguments(parser)
    return parser.parse_args(list(argv))


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
    # TPOT = (latency - ttft) / (tokens - 1): 200 ms and 100 ms
    assert metrics.tpot_ms.mean == pytest.approx(150.0)
    assert metrics.itl_ms.mean == pytest.approx(1000 * statistics.mean([0.2, 0.2, 0.1, 0.1, 0.1, 0.1]))
    assert metrics.e2el_ms.percentiles["p50"] == pytest.approx(600.0)
    table = format_table(metrics, float("inf"), None)
    flat = metrics.to_vllm_keys()
    assert flat["mean_tpot_ms"] == pytest.approx(150.0) and flat["p99_e2el_ms"] == metrics.e2el_ms.percentiles["p99"]
    assert flat["completed"] == 2 and flat["duration"] == 2.0
    assert "Mean TTFT (ms)" in table and "P99 ITL (ms)" in table and "inf" in table


def test_poisson_arrivals_have_the_requested_rate_and_inf_sends_at_once():
    delays = arrival_delays(4000, request_rate=5.0, seed=3)
    gaps = [b - a for a, b in zip(delays, delays[1:])]
    assert delays[0] == 0.0 and all(gap >= 0 for gap in gaps)
    assert statistics.mean(gaps) == pytest.approx(0.2, rel=0.08)
    assert statistics.stdev(gaps) == pytest.approx(0.2, rel=0.1)  # exponential: std equals mean
    assert arrival_delays(5, float("inf"), 0) == [0.0] * 5
    assert arrival_delays(10, 2.0, 1) == arrival_delays(10, 2.0, 1)


def test_workload_is_seeded_with_exact_lengths():
    ids = build_workload(_args("--num-prompts", "3", "--input-len", "7", "--seed", "5"))
    assert [len(request.prompt) for request in ids] == [7, 7, 7]
    assert all(1000 <= token < 10000 for request in ids for token in request.prompt)
    assert ids[0].prompt == build_workload(_args("--num-prompts", "3", "--input-len", "7", "--seed", "5"))[0].prompt
    text = build_workload(_args("--num-prompts", "2", "--input-len", "9", "--prompt-kind", "random-text"))
    assert all(isinstance(request.prompt, str) and len(request.prompt.split()) == 9 for request in text)


@pytest.mark.parametrize("rate, kind", [("inf", "token-ids"), ("20", "random-text")])
def test_against_a_live_server(live_server, tmp_path, capsys, rate, kind):  # noqa: F811
    output = tmp_path / "bench.json"
    args = _args("--base-url", live_server.base_url, "--num-prompts", "6", "--request-rate", rate,
                 "--input-len", "16", "--output-len", "5", "--prompt-kind", kind, "--output-json", str(output))
    assert run_serve_bench(args) == 0
    assert "Serving Benchmark Result" in capsys.readouterr().out
    report = json.loads(output.read_text())
    metrics = report["metrics"]
    assert report["vllm_keys"]["mean_ttft_ms"] == metrics["ttft_ms"]["mean"]
    assert report["config"]["model"] == "tiny"
    assert metrics["completed"] == 6 and metrics["failed"] == 0
    assert metrics["total_output_tokens"] == 30  # ignore_eos: exactly output_len each
    if kind == "token-ids":
        assert metrics["total_input_tokens"] == 96
    assert 0 < metrics["ttft_ms"]["mean"] <= metrics["e2el_ms"]["mean"]
    assert metrics["itl_ms"]["mean"] > 0 and metrics["tpot_ms"]["mean"] > 0
    assert metrics["output_throughput"] == pytest.approx(30 / metrics["duration_s"])


def test_failures_are_counted_and_the_exit_code_says_so(live_server, tmp_path):  # noqa: F811
    args = _args("--base-url", live_server.base_url, "--num-prompts", "2", "--input-len", "600",
                 "--output-len", "5", "--no-warmup", "--output-json", str(tmp_path / "b.json"))
    assert run_serve_bench(args) == 1
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["metrics"]["failed"] == 2 and "400" in report["errors"][0]
