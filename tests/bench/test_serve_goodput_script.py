"""benchmarks/gpu/serve_goodput.py at tiny scale on the CPU: the issue's goodput, fairness and energy runs, end to
end through four `joule serve` subprocesses (chunked fcfs, prefill-first, fair, deadline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers.scripts import BENCHMARKS, load_script
from server.conftest import tiny_model_dir  # noqa: F401  (fixture)

SCRIPT = BENCHMARKS / "gpu" / "serve_goodput.py"


def _load_script():
    return load_script(SCRIPT, "serve_goodput")


@pytest.mark.slow  # four server starts on the CPU: ~40 s
def test_the_gpu_script_runs_at_tiny_scale(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    script = _load_script()
    assert script.main(["--tiny", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path),
                        "--logs", str(tmp_path / "logs")]) == 0
    printed = capsys.readouterr().out.rstrip().splitlines()
    assert printed[-1].startswith("SUMMARY TPOT SLO")
    results = json.loads((tmp_path / "serve_goodput.json").read_text())
    goodput = results["goodput"]
    assert goodput["calm_p50_tpot_ms"] > 0 and goodput["calm_p50_ttft_ms"] > 0
    for row in goodput["by_factor"]:
        assert set(row["max_goodput"]) == {"chunked", "prefill-first", "chunked+deadline"}
        if row["max_goodput"]["prefill-first"] > 0:
            assert row["ratio_vs_prefill_first"]["chunked"] == pytest.approx(
                row["max_goodput"]["chunked"] / row["max_goodput"]["prefill-first"])
    tighter, looser = goodput["by_factor"][0], goodput["by_factor"][-1]
    # light load: the loosest SLOs (10x the calm TPOT) are met by every schedule; the tightest (3x) can be missed
    # on a shared 2-core machine (a CI run saw the deadline server's TPOT at 2x its usual)
    assert all(value > 0 for value in looser["max_goodput"].values())
    assert tighter["tpot_slo_ms"] < looser["tpot_slo_ms"]
    assert all(tighter["max_goodput"][name] <= looser["max_goodput"][name] for name in tighter["max_goodput"])
    tbt = results["goodput_tbt"]  # TTFT + each request's largest gap between tokens, no TPOT
    assert tbt["judged_on"] == "ttft+tbt" and tbt["calm_p50_tpot_ms"] == goodput["calm_p50_tpot_ms"]
    assert [row["tbt_slo_factor"] for row in tbt["by_factor"]] == [2.0, 3.0, 5.0, 10.0]
    for row in tbt["by_factor"]:
        assert row["tbt_slo_ms"] == pytest.approx(row["tbt_slo_factor"] * tbt["calm_p50_tpot_ms"])
        assert set(row["max_goodput"]) == {"chunked", "prefill-first", "chunked+deadline"}
    tighter, looser = tbt["by_factor"][0], tbt["by_factor"][-1]
    assert all(tighter["max_goodput"][name] <= looser["max_goodput"][name] for name in tighter["max_goodput"])
    assert any(line.startswith("SUMMARY TBT SLO") for line in printed[-3:])
    assert any(line.startswith("max goodput (req/s) by TBT") for line in printed)
    fairness = results["fairness"]
    assert fairness["solo"]["heavy_completed"] == 0 and fairness["solo"]["light_failed"] == 0
    for policy in ("fcfs", "fair"):
        assert fairness[policy]["heavy_completed"] > 0 and fairness[policy]["light_failed"] == 0
        assert fairness[policy]["p99_ttft_vs_solo"] > 0
    for rows in results["energy"].values():  # the CPU server estimates joules and reports them
        assert all(row["joules_per_output_token"] > 0 and row["energy_source"] == "estimated" for row in rows)
    plots = sorted(Path(path).name for path in results["plots"])
    assert plots == ["energy_vs_rate.png", "fairness_light_ttft_cdf.png", "goodput_vs_rate.png",
                     "latency_cdfs.png", "latency_vs_rate.png"]
    sweeps = json.loads((tmp_path / "sweeps.json").read_text())
    assert set(sweeps) == {"chunked", "prefill-first", "chunked+deadline"}
    deadline_requests = sweeps["chunked+deadline"]["runs"][0]["requests"]
    assert all(request["met_slo"] is not None for request in deadline_requests)
    assert all(request["max_itl_s"] >= 0 for request in deadline_requests)
    assert results["chunk_budgets"] == {"chunked": 32}
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "server-chunked-deadline.log", "server-chunked-fair.log", "server-chunked-fcfs.log",
        "server-prefill-first.log"]


@pytest.mark.slow  # three server starts on the CPU: ~30 s
def test_chunk_budgets_sweep_the_chunked_server_once_per_budget(tiny_model_dir, tmp_path, capsys):  # noqa: F811
    script = _load_script()
    assert script.main(["--tiny", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path), "--logs",
                        str(tmp_path / "logs"), "--chunk-budgets", "32,64", "--skip-fairness", "--no-deadline"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("SUMMARY TPOT SLO")
    results = json.loads((tmp_path / "serve_goodput.json").read_text())
    assert results["chunk_budgets"] == {"chunked-32": 32, "chunked-64": 64} and results["fairness"] == {
        "heavy_rate": results["fairness"]["heavy_rate"]}
    for table in (results["goodput"], results["goodput_tbt"]):
        for row in table["by_factor"]:
            assert list(row["max_goodput"]) == ["chunked-32", "chunked-64", "prefill-first"]
            assert set(row["ratio_vs_prefill_first"]) == {"chunked-32", "chunked-64"}
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == [
        "server-chunked-32-fcfs.log", "server-chunked-64-fcfs.log", "server-prefill-first.log"]
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--chunk-budget", "32", "--chunk-budgets", "32,64", "--out", str(tmp_path)])


def test_fairness_only_runs_the_three_light_tenant_runs_at_a_given_heavy_rate(tiny_model_dir, tmp_path,  # noqa: F811
                                                                             capsys):
    script = _load_script()
    assert script.main(["--tiny", "--model-dir", str(tiny_model_dir), "--out", str(tmp_path), "--logs",
                        str(tmp_path / "logs"), "--fairness-only", "--heavy-rate", "12"]) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("SUMMARY fair light p99 TTFT")
    fairness = json.loads((tmp_path / "fairness.json").read_text())["fairness"]
    assert fairness["heavy_rate"] == 12.0 and fairness["solo"]["heavy_completed"] == 0
    for policy in ("fcfs", "fair"):
        assert fairness[policy]["heavy_completed"] > 0 and fairness[policy]["light_failed"] == 0
        assert fairness[policy]["p99_ttft_vs_solo"] > 0
        pauses = fairness[policy]["server_pauses"]  # read from the server's /metrics around the run
        assert pauses["event_loop_lag"]["count"] > 0 and 0 < pauses["api_cpu_share"]
    assert (tmp_path / "fairness_light_ttft_cdf.png").exists()
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["server-chunked-fair.log",
                                                                    "server-chunked-fcfs.log"]
    with pytest.raises(SystemExit):
        script.main(["--tiny", "--fairness-only", "--out", str(tmp_path)])  # no --heavy-rate
