"""benchmarks/gpu/bs1_ab.py on the CPU, its commands shrunk to the default model: each variant runs in its own
process with its switch set, and the table reports every variant (the throughput modes read the engine's row)."""

from __future__ import annotations

import json
import sys

import pytest
from helpers.scripts import BENCHMARKS, load_script

pytestmark = pytest.mark.slow
script = load_script(BENCHMARKS / "gpu" / "bs1_ab.py", "bs1_ab")
SMALL = ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "256"]


def test_a_throughput_ab_runs_each_variant_and_tabulates(tmp_path, monkeypatch, capsys):
    command = [sys.executable, "-m", "joule.cli", "bench", "throughput", *SMALL, "--num-prompts", "2",
               "--input-len", "uniform:4:8", "--output-len", "uniform:2:3", "--repeat", "2"]
    monkeypatch.setitem(script.THROUGHPUT, "--w2", ("w2", command))
    monkeypatch.setattr(sys, "argv", ["bs1_ab.py", str(tmp_path), "1", "--w2", "JOULE_PDL_EARLY_TRIGGER=0,1"])
    script.main()
    out = capsys.readouterr().out
    assert "round 0: JOULE_PDL_EARLY_TRIGGER=0:" in out and "round 0: JOULE_PDL_EARLY_TRIGGER=1:" in out
    assert "failed" not in out
    assert out.count("(median of ") == 2  # each variant's row: the median of its two warm runs
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "w2-JOULE_PDL_EARLY_TRIGGER-0-0.json", "w2-JOULE_PDL_EARLY_TRIGGER-1-0.json"]


def test_throughput_variants_run_warm_repeats():
    for _, command in script.THROUGHPUT.values():
        assert command[-2:] == ["--repeat", str(script.WARM_RUNS)] and script.WARM_RUNS >= 3


def test_a_code_ab_runs_a_variant_from_another_source_tree(tmp_path, monkeypatch, capsys):
    """``JOULE_TREE=.,DIR``: the second variant runs from DIR (its working directory and import path), the first
    from this checkout; both produce their rows."""
    tree = tmp_path / "old tree"
    tree.mkdir()
    (tree / "joule").symlink_to(BENCHMARKS.parent / "joule", target_is_directory=True)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "joule.cli", "bench", "throughput", *SMALL, "--num-prompts", "2",
               "--input-len", "4", "--output-len", "2", "--repeat", "1"]
    monkeypatch.setitem(script.THROUGHPUT, "--w3", ("w3", command))
    monkeypatch.setattr(sys, "argv", ["bs1_ab.py", str(out), "1", "--w3", f"JOULE_TREE=.,{tree}"])
    script.main()
    printed = capsys.readouterr().out
    assert "failed" not in printed
    assert "round 0: JOULE_TREE=.:" in printed and f"round 0: JOULE_TREE={tree}:" in printed
    assert len(list(out.iterdir())) == 2


def test_sampled_runs_batch_one_at_temperature_08(tmp_path, monkeypatch, capsys):
    command = [sys.executable, "-m", "joule.cli", "bench", "latency", *SMALL, "--input-len", "4", "--output-len", "3",
               "--batch-size", "1", "--num-iters", "1"]
    monkeypatch.setattr(script, "COMMAND", command)
    monkeypatch.setattr(sys, "argv", ["bs1_ab.py", str(tmp_path), "1", "--sampled", "JOULE_FUSED_SAMPLING=0,1"])
    script.main()
    printed = capsys.readouterr().out
    assert "failed" not in printed and "round 0: JOULE_FUSED_SAMPLING=1:" in printed
    saved = sorted(tmp_path.iterdir())
    assert [path.name for path in saved] == ["latency_t08-JOULE_FUSED_SAMPLING-0-0.json",
                                             "latency_t08-JOULE_FUSED_SAMPLING-1-0.json"]
    assert json.loads(saved[0].read_text())["temperature"] == 0.8
