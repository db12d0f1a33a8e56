"""``joule bench latency``: one batch decoded to the end, greedy or sampled, its table and JSON."""

from __future__ import annotations

import argparse
import json

import pytest

from joule.bench.latency import add_latency_arguments, run_latency


def _args(model_dir, tmp_path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_latency_arguments(parser)
    # 16 output tokens, medians of 3 runs: the whole generation outlasts the 1-token prefill run by 15 decode
    # steps even on a machine busy with other work (with 6 tokens and 1 run, a contended prefill run did not).
    return parser.parse_args(["--model", str(model_dir), "--dtype", "float32", "--max-model-len", "64",
                              "--input-len", "8", "--output-len", "16", "--batch-size", "2", "--num-iters", "3",
                              "--output-json", str(tmp_path / "latency.json"), *extra])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from helpers.tiny_models import build_tiny_checkpoint

    directory = tmp_path_factory.mktemp("latency-llama")
    build_tiny_checkpoint("llama-gqa4-tied", directory)
    return directory


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_latency_bench_reports_decode_speed_greedy_or_sampled(model_dir, tmp_path, capsys, temperature):
    assert run_latency(_args(model_dir, tmp_path, "--temperature", temperature)) == 0
    result = json.loads((tmp_path / "latency.json").read_text())
    assert result["temperature"] == float(temperature)
    assert result["batch_size"] == 2 and result["output_len"] == 16
    assert result["total_s"] > result["prefill_s"] > 0 and result["decode_tok_per_s"] > 0
    assert "tok/s" in capsys.readouterr().out  # the table


def test_latency_bench_rejects_a_negative_temperature(model_dir, tmp_path):
    with pytest.raises(SystemExit, match="temperature"):
        run_latency(_args(model_dir, tmp_path, "--temperature", "-1"))
