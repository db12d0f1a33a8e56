"""`joule bench throughput` with length distributions: nano-vllm's workload from the CLI, the same requests as the
GPU scripts draw, and bad lengths named by their option before any model loads."""

from __future__ import annotations

import json

import pytest

from joule.bench.workload import (
    LengthDistribution,
    distribution_workload,
    fixed_length_workload,
    uniform_length_workload,
)
from joule.cli import main

SMALL_ENGINE = ["--dtype", "float32", "--kv-cache-memory-bytes", str(64 << 20), "--max-model-len", "512"]


def test_fixed_and_nano_vllm_lengths_give_the_scripts_requests():
    fixed = distribution_workload(5, LengthDistribution.parse("12"), LengthDistribution.parse("7"), 1000, seed=3,
                                  avoid_ids={0, 1})
    assert fixed == fixed_length_workload(5, 12, 7, 1000, seed=3, avoid_ids={0, 1})
    uniform = LengthDistribution.parse("uniform:100:1024")
    assert distribution_workload(8, uniform, uniform, 5000) == uniform_length_workload(8, 100, 1024, 5000)


def test_other_shapes_are_drawn_from_the_seed_within_their_bounds():
    inputs, outputs = LengthDistribution.parse("lognormal:64:1.0:200"), LengthDistribution.parse("uniform:3:9")
    requests = distribution_workload(50, inputs, outputs, 300, seed=1, avoid_ids={0, 299})
    assert requests == distribution_workload(50, inputs, outputs, 300, seed=1, avoid_ids={0, 299})
    assert all(4 <= len(request.prompt_token_ids) <= 200 and 3 <= request.output_len <= 9 for request in requests)
    assert len({len(request.prompt_token_ids) for request in requests}) > 10
    assert all(token not in (0, 299) for request in requests for token in request.prompt_token_ids)


def test_bad_lengths_are_named_before_a_model_loads(capsys):
    assert main(["bench", "throughput", "--input-len", "uniform:5"]) == 2
    assert "--input-len" in capsys.readouterr().err
    assert main(["bench", "throughput", "--output-len", "uniform:9:3"]) == 2
    assert "--output-len" in capsys.readouterr().err
    assert main(["bench", "throughput", "--input-len", "uniform:4:8", "--compare", "hf"]) == 2
    assert "--compare hf needs fixed" in capsys.readouterr().err


@pytest.mark.slow
def test_uniform_lengths_run_end_to_end(tmp_path):
    output = tmp_path / "result.json"
    assert main(["bench", "throughput", *SMALL_ENGINE, "--num-prompts", "3", "--input-len", "uniform:4:9",
                 "--output-len", "uniform:2:4", "--workload-seed", "5", "--output-json", str(output)]) == 0
    saved = json.loads(output.read_text())
    expected = distribution_workload(3, LengthDistribution.parse("uniform:4:9"), LengthDistribution.parse("uniform:2:4"),
                                     49152, seed=5)
    assert saved["info"]["input_len"] == "uniform:4:9" and saved["info"]["output_len"] == "uniform:2:4"
    assert saved["results"][0]["output_tokens"] == sum(request.output_len for request in expected)
