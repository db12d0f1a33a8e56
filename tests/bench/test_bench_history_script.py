"""benchmarks/gpu/bench_history.py: every saved engine bench of a kind read in session and call order, the issue's
targets counted, the plot drawn (no GPU: it reads JSON)."""

from __future__ import annotations

import gzip
import json

import pytest
from helpers.scripts import BENCHMARKS, load_script

script = load_script(BENCHMARKS / "gpu" / "bench_history.py", "bench_history")


def bench(batch1: float, workload2: float, workload3: float, peer_runs: list[float]) -> dict:
    return {"b": [{"model": "1b bf16 unmetered", "roofline_fraction": 0.6},
                  {"model": "1b bf16 unmetered lookahead", "roofline_fraction": batch1, "temperature": 0.0},
                  {"model": "1b bf16 unmetered lookahead T=0.8", "roofline_fraction": 0.7, "temperature": 0.8}],
            "(c) qwen3-0.6b": {"output_tok_per_s": workload2},
            "d": {"output_tok_per_s": workload3},
            "d_generate_batch": {"output_tok_per_s": peer_runs[0], "runs_tok_per_s": peer_runs}}


def write(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            json.dump(data, handle)
    else:
        path.write_text(json.dumps(data))


def test_runs_come_in_session_then_call_order_with_the_targets_counted(tmp_path, capsys):
    write(tmp_path / "h100_2026-01-02" / "engine_bench.json", bench(0.85, 21_000, 31_000, [1_000, 1_100]))
    write(tmp_path / "h100_2026-01-01b" / "call3" / "engine_bench.json.gz", bench(0.79, 19_000, 30_000, [1_200]))
    write(tmp_path / "h100_2026-01-01b" / "engine_bench_call2.json", {"d": {"output_tok_per_s": 29_000}})
    write(tmp_path / "h100_2026-01-01b" / "engine_bench.json", bench(0.81, 20_500, 33_000, [1_000]))
    write(tmp_path / "h200_2026-01-01" / "engine_bench.json", bench(0.7, 25_000, 36_000, [1_200]))
    runs = script.collect_runs(tmp_path, "h100")
    assert [run.label for run in runs] == ["2026-01-01b call1", "2026-01-01b call2", "2026-01-01b call3",
                                           "2026-01-02 call1"]
    assert runs[0].batch1_roofline == 0.81  # the greedy lookahead row, not the sampled or plain ones
    assert runs[1].workload3_ratio is None and runs[1].batch1_roofline is None  # a bench without those rows
    assert runs[3].peer_tok_s == 1_100 and runs[3].workload3_ratio == pytest.approx(31_000 / 1_100)
    lines = script.summary_lines(runs)
    assert "-" in lines[2].split()  # the missing values shown as such
    assert "batch1_roofline: median 0.81, target 0.8 met in 2 of 3 benches" in lines
    assert "workload3_ratio: median 28.18, target 30 met in 1 of 3 benches" in lines
    script.main(["--root", str(tmp_path), "--kind", "h100", "--since", "2026-01-02", "--plot",
                 str(tmp_path / "history.png")])
    out = capsys.readouterr().out
    assert "2026-01-02 call1" in out and "2026-01-01b" not in out
    assert (tmp_path / "history.png").stat().st_size > 10_000
    with pytest.raises(SystemExit, match="no engine_bench JSON"):
        script.main(["--root", str(tmp_path), "--kind", "a100"])


def test_the_saved_h100_benches_are_all_read():
    runs = script.collect_runs(script.GPU_RESULTS, "h100")
    labels = [run.label for run in runs]
    assert len(runs) >= 15 and "2026-12-06l call6" in labels and labels.index("2026-12-06k call8") < labels.index(
        "2026-12-06l call1")
    assert all(run.workload3_ratio and 20 < run.workload3_ratio < 40 for run in runs)


def test_files_named_for_what_they_measured_keep_those_names(tmp_path):
    session = tmp_path / "h200_2026-01-03d"
    for name in ("engine_bench.json", "engine_bench_call1_before_fix.json", "engine_bench_early_exit.json.gz",
                 "engine_bench_call6_argmax.json"):
        write(session / name, bench(0.5, 20_000, 30_000, [1_000]))
    labels = [run.label for run in script.collect_runs(tmp_path, "h200")]
    assert labels == ["2026-01-03d call1", "2026-01-03d early_exit", "2026-01-03d call1_before_fix",
                      "2026-01-03d call6_argmax"]
