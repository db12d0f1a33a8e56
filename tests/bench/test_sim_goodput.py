"""benchmarks/sim/goodput.py: chunked prefill vs prefill-first goodput on simulated time, at tiny sizes."""

from __future__ import annotations

import json

import pytest
from helpers.scripts import BENCHMARKS, load_script

from joule.bench.serve_workload import WorkloadOptions, plan_run
from joule.bench.workload import LengthDistribution
from joule.perf.metrics import SLO

SCRIPT = BENCHMARKS / "sim" / "goodput.py"
RATES = [2.0, 400.0]


def _load_script():
    return load_script(SCRIPT, "sim_goodput")


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def sweeps(script):
    return script.simulate_sweeps("uniform:256:1024", "uniform:4:16", RATES, [64, 256], duration_s=1.0,
                                  max_model_len=1024, progress=lambda _: None)


def test_schedules_are_the_engines_chunked_and_prefill_first_settings(script):
    found = script.schedules([2048, 8192], max_model_len=4096)
    assert list(found) == ["chunked-2048", "chunked-8192", "prefill-first"]
    assert found["chunked-2048"] == {"max_num_batched_tokens": 2048, "enable_chunked_prefill": True}
    # the engine's budget without chunking on a GPU: max(8192, max_model_len), so any prompt fits one step
    assert found["prefill-first"] == {"max_num_batched_tokens": 8192, "enable_chunked_prefill": False}
    assert script.schedules([512], max_model_len=16384)["prefill-first"]["max_num_batched_tokens"] == 16384


def test_the_simulated_requests_are_what_the_gpu_benchmark_sends(script):
    options = WorkloadOptions(num_prompts=1, input_len=LengthDistribution.parse("uniform:100:900"),
                              output_len=LengthDistribution.parse("uniform:4:40", "output"), duration_s=2.0,
                              max_model_len=512, seed=0)
    planned = plan_run(options, [], 10.0, SLO())
    timed = script.timed_requests(options, 10.0)
    assert len(timed) == len(planned) == 20
    assert [t.arrival_time for t in timed] == [p.send_at for p in planned]
    assert [len(t.request.prompt_token_ids) for t in timed] == [p.prompt_len for p in planned]
    assert all(len(t.request.prompt_token_ids) + t.request.output_len <= 512 for t in timed)


def test_every_schedule_has_a_run_per_rate_and_goodput_within_throughput(script, sweeps):
    assert list(sweeps) == ["chunked-64", "chunked-256", "prefill-first"]
    slo = script._gpu_script().calibrated_slo(sweeps["chunked-64"], 2.0, 10.0)
    for name, report in sweeps.items():
        assert [run.rate for run in report.runs] == RATES
        for run in report.with_slo(slo, script.PERCENTILES).runs:
            sent = len(run.results)
            assert sent == max(1, round(run.rate * 1.0)) and run.metrics.completed == sent  # the simulator drains
            assert all(r.ttft > 0 and r.latency >= r.ttft for r in run.results)
            assert 0 <= run.metrics.goodput <= run.metrics.request_throughput
            assert run.metrics.goodput * run.metrics.duration_s <= sent + 1e-9


def test_ratios_are_the_max_goodputs_over_prefill_first_and_slos_come_from_the_calm_chunked_run(script, sweeps):
    summary = script.summarize(sweeps, [1.5, 3.0], 10.0, [2.0, 10.0])
    calm = sweeps["chunked-64"].runs[0].metrics
    table = summary["goodput"]
    assert table["calm_p50_tpot_ms"] == pytest.approx(calm.tpot_ms.median)
    assert table["calm_p50_ttft_ms"] == pytest.approx(calm.ttft_ms.median)
    for row in table["by_factor"]:
        assert row["tpot_slo_ms"] == pytest.approx(row["tpot_slo_factor"] * calm.tpot_ms.median)
        assert row["ttft_slo_s"] == pytest.approx(10.0 * calm.ttft_ms.median / 1000)
        best = row["max_goodput"]
        assert set(best) == set(sweeps)
        for name, report in sweeps.items():
            slo = SLO(ttft_s=row["ttft_slo_s"], tpot_s=row["tpot_slo_ms"] / 1000)
            assert best[name] == pytest.approx(max(run.metrics.goodput for run in report.with_slo(
                slo, script.PERCENTILES).runs))
        assert best["prefill-first"] > 0  # the calm rate meets a 10x TTFT SLO on every schedule
        for name in ("chunked-64", "chunked-256"):
            assert row["ratio_vs_prefill_first"][name] == pytest.approx(best[name] / best["prefill-first"])
    tight, loose = table["by_factor"]
    assert all(tight["max_goodput"][name] <= loose["max_goodput"][name] for name in sweeps)
    assert summary["goodput_tbt"]["judged_on"] == "ttft+tbt"


def test_prefill_first_stalls_decodes_for_whole_prompts(sweeps):
    """Under load a prefill-first decode waits for whole prompts (up to 1,024 tokens), a chunked-64 one for
    64-token chunks: the largest gap between tokens shows it."""
    def worst_gap(name):
        return max(r.max_itl for r in sweeps[name].runs[-1].results)

    assert worst_gap("prefill-first") > worst_gap("chunked-64")


def test_command_line_writes_the_summary(script, tmp_path, capsys):
    out = tmp_path / "summary.json"
    script.main(["--input-len", "uniform:64:128", "--output-len", "8", "--rates", "2,20", "--budgets", "64",
                 "--factors", "2", "--duration-s", "1", "--max-model-len", "256", "--quiet", "--json", str(out),
                 "--deadline-factor", "2"])
    printed = capsys.readouterr().out
    assert "max goodput (req/s) by TPOT SLO factor" in printed and "chunked-64/prefill-first" in printed
    summary = json.loads(out.read_text())
    assert summary["workload"]["input_len"] == "uniform:64:128" and summary["rates"] == [2.0, 20.0]
    assert [row["tpot_slo_factor"] for row in summary["goodput"]["by_factor"]] == [2.0]
    assert list(summary["runs"]) == ["chunked-64", "prefill-first", "chunked-64+deadline"]
    assert set(summary["goodput"]["by_factor"][0]["ratio_vs_prefill_first"]) == {"chunked-64", "chunked-64+deadline"}


def test_the_gpu_script_takes_the_workload_from_the_command_line(tmp_path, monkeypatch):
    """benchmarks/gpu/serve_goodput.py --input-len/--output-len/--max-model-len/--duration-s reach the Scale its
    servers and sweeps use (checked at the first server start, which is stopped there)."""
    gpu = load_script(BENCHMARKS / "gpu" / "serve_goodput.py", "serve_goodput")
    seen = []

    class Started(Exception):
        pass

    class FakeServer:
        def __init__(self, name, args, logs, scale):
            seen.append((name, args, scale))
            raise Started

    monkeypatch.setattr(gpu, "Server", FakeServer)
    with pytest.raises(Started):
        gpu.main(["--out", str(tmp_path), "--input-len", "uniform:2048:6144", "--output-len", "uniform:16:64",
                  "--max-model-len", "8192", "--duration-s", "5", "--chunk-budgets", "2048,8192", "--skip-fairness"])
    name, args, scale = seen[0]
    assert name == "chunked-2048-fcfs" and args[-2:] == ["--max-num-batched-tokens", "2048"]
    assert (scale.input_len, scale.output_len, scale.max_model_len, scale.duration_s) == (
        "uniform:2048:6144", "uniform:16:64", 8192, 5.0)
    seen.clear()
    with pytest.raises(Started):
        gpu.main(["--out", str(tmp_path), "--skip-fairness"])
    assert (seen[0][2].input_len, seen[0][2].max_model_len, seen[0][2].duration_s) == ("uniform:1024:3072", 4096, 10.0)
    for bad in (["--input-len", "triangle:3"], ["--max-model-len", "1"], ["--duration-s", "0"]):
        with pytest.raises(SystemExit):
            gpu.main(["--out", str(tmp_path), *bad])
