"""`joule simulate` / `joule plan` through the perf CLI entry point (no torch needed)."""

from __future__ import annotations

import json

import pytest

from joule.perf.cli import load_model_config, main


def test_simulate_writes_metrics_and_plots(tmp_path, capsys):
    output = tmp_path / "run.json"
    code = main([
        "simulate", "--model", "qwen3-0.6b", "--hardware", "L4=1,A10G=1",
        "--workload", "input=fixed:64,output=fixed:16,num=30", "--sweep-rates", "5,20",
        "--slo", "ttft=500ms,tpot=0.05", "--max-model-len", "1024", "--output-json", str(output),
        "--plot-dir", str(tmp_path), "--price", "L4=0.5",
    ])
    assert code == 0
    rows = json.loads(output.read_text())
    assert [row["offered_rate"] for row in rows] == [5.0, 20.0]
    assert rows[0]["num_finished"] == 30 and rows[0]["hardware"] == ["L4", "A10G"]
    assert rows[0]["output_throughput"] == pytest.approx(30 * 16 / rows[0]["makespan_s"])
    assert (tmp_path / "latency_cdf.png").stat().st_size > 0 and (tmp_path / "sweep.png").stat().st_size > 0
    assert "goodput" in capsys.readouterr().out


def test_simulate_with_decode_lookahead_is_faster_for_one_stream_and_is_the_gpu_default(tmp_path):
    makespans = []
    for extra in (["--no-decode-lookahead"], ["--decode-lookahead"], []):
        output = tmp_path / f"run{len(extra)}.json"
        code = main(["simulate", "--model", "llama-3.2-1b", "--hardware", "H200", "--workload",
                     "input=fixed:128,output=fixed:64,num=1", "--output-json", str(output), *extra])
        assert code == 0
        makespans.append(json.loads(output.read_text())[0]["makespan_s"])
    assert makespans[1] < makespans[0]  # host work hidden behind the device on every continuation step
    assert makespans[2] == makespans[1]  # as the engine on CUDA: on unless turned off


def test_simulate_charges_streamed_outputs_and_metering_unless_told_the_run_has_neither(tmp_path):
    import dataclasses

    from joule.perf.profile import resolve_profile

    profile = dataclasses.replace(resolve_profile("H200", "bfloat16"), streamed_sequence_overhead_s=1e-3,
                                  metered_step_overhead_s=1e-3)
    profile.save(tmp_path / "profile.json")
    makespans = []
    for extra in ([], ["--final-only"], ["--final-only", "--unmetered"]):
        output = tmp_path / f"run{len(extra)}.json"
        assert main(["simulate", "--model", "llama-3.2-1b", "--hardware", "H200", "--profile",
                     str(tmp_path / "profile.json"), "--no-decode-lookahead", "--workload",
                     "input=fixed:128,output=fixed:32,num=4", "--output-json", str(output), *extra]) == 0
        makespans.append(json.loads(output.read_text())[0]["makespan_s"])
    # 4 x 32 outputs at 1 ms; then 32 metered steps at 1 ms (the prompts take one step).
    assert makespans[0] - makespans[1] == pytest.approx(4 * 32 * 1e-3, rel=1e-6)
    assert makespans[1] - makespans[2] == pytest.approx(32 * 1e-3, rel=1e-6)


def test_simulate_with_tenants_prints_a_line_per_tenant(tmp_path, capsys):
    output = tmp_path / "run.json"
    assert main(["simulate", "--model", "qwen3-0.6b", "--hardware", "H100", "--workload",
                 "input=fixed:64,output=fixed:16,num=20,rate=10", "--tenant", "light:rate=2,num=4,ttft=1s",
                 "--tenant", "heavy:share=1", "--scheduling-policy", "fair", "--output-json", str(output)]) == 0
    printed = capsys.readouterr().out
    assert "tenant light: 4/4 requests" in printed and "tenant heavy: 20/20 requests" in printed
    row = json.loads(output.read_text())[0]
    assert row["tenants"]["light"]["slo_attainment"] == 1.0
    assert main(["simulate", "--model", "qwen3-0.6b", "--workload", "num=4", "--tenant", "bad name"]) == 2
    assert "tenant name must be" in capsys.readouterr().err


def test_simulate_lists_every_request_with_bench_serves_keys_when_asked(tmp_path):
    output = tmp_path / "run.json"
    assert main(["simulate", "--model", "qwen3-0.6b", "--hardware", "H100", "--workload",
                 "input=fixed:64,output=fixed:16,num=12,rate=10", "--tenant", "light:rate=2,num=3,ttft=1s",
                 "--tenant", "heavy:share=1", "--scheduling-policy", "fair", "--per-request",
                 "--output-json", str(output)]) == 0
    row = json.loads(output.read_text())[0]
    requests = row["requests"]
    assert len(requests) == row["num_requests"] == 15
    assert [r["arrival_s"] for r in requests] == sorted(r["arrival_s"] for r in requests)
    assert {r["tenant"] for r in requests} == {"light", "heavy"}
    assert sum(r["tenant"] == "light" for r in requests) == 3
    for request in requests:
        assert request["success"] and request["prompt_len"] == 64 and request["output_tokens"] == 16
        assert 0 < request["ttft_s"] <= request["e2el_s"] and request["tpot_s"] > 0
        assert request["met_slo"] is (request["ttft_s"] <= 1.0 if request["tenant"] == "light" else None)
    assert sorted(r["ttft_s"] for r in requests)[len(requests) // 2] == pytest.approx(row["ttft_s"]["p50"])
    assert main(["simulate", "--model", "qwen3-0.6b", "--workload", "num=4", "--output-json", str(output)]) == 0
    assert "requests" not in json.loads(output.read_text())[0]


def test_plan_prints_plans_and_errors_are_clear(tmp_path, capsys):
    code = main([
        "plan", "--model", "qwen3-0.6b", "--hardware", "L4", "--workload", "input=fixed:64,output=fixed:16,rate=4,num=40",
        "--slo", "ttft=1,tpot=0.1", "--batched-tokens", "2048", "--max-seqs", "32", "--search-requests", "30",
        "--max-model-len", "1024", "--no-mixed", "--output-json", str(tmp_path / "plans.json"),
    ])
    assert code == 0
    plans = json.loads((tmp_path / "plans.json").read_text())
    assert plans[0]["meets_slo"] and plans[0]["counts"]["L4"] >= 1
    assert main(["plan", "--model", "qwen3-0.6b", "--workload", "fixed,num=5", "--slo", "ttft=1"]) == 2
    assert "rate" in capsys.readouterr().err
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        load_model_config("no-such-model")


def test_perf_modules_import_only_torch_free_joule_modules_at_top_level():
    """joule/perf may import joule.engine, joule.model.config, joule.sampling_params, joule.bench.workload,
    joule.runtime.chunk_sizes (torch-free: the chunk graph passes), joule.heap (the collector, stdlib only), itself,
    the standard library, numpy and matplotlib; torch and the rest of the runtime only inside functions."""
    import ast
    import sys
    from pathlib import Path

    allowed_joule = ("joule.engine", "joule.model.config", "joule.sampling_params", "joule.bench.workload", "joule.perf",
                     "joule.runtime.chunk_sizes", "joule.heap")
    allowed_other = set(sys.stdlib_module_names) | {"numpy", "matplotlib"}
    package = Path(__file__).resolve().parents[2] / "joule" / "perf"
    for path in sorted(package.glob("*.py")) + [package.parent / "runtime" / "chunk_sizes.py",
                                                package.parent / "heap.py"]:
        for node in ast.parse(path.read_text()).body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("joule"):
                    assert name.startswith(allowed_joule), f"{path.name} imports {name}"
                else:
                    assert name.split(".")[0] in allowed_other, f"{path.name} imports {name}"
