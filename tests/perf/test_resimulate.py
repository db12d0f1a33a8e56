"""A saved validation's runs simulated again from the report alone (``perf validate --recheck``)."""

from __future__ import annotations

import json

import pytest

from joule.perf.hardware import get_hardware
from joule.perf.measure import build_engine
from joule.perf.profile import DeviceProfile
from joule.perf.resimulate import inferred_settings, offline_requests, resimulate, serving_requests
from joule.perf.validate import compare_run
from tests.perf.test_measure_validate import TINY_LLAMA


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-llama-resimulate")
    (directory / "config.json").write_text(json.dumps(TINY_LLAMA))
    return build_engine(str(directory), "float32", "dummy", "cpu")


def _saved(comparison: dict, kind: str, spec: str) -> dict:
    """The section as a report file holds it (JSON round trip)."""
    return json.loads(json.dumps(comparison | {"workload": {"kind": kind, "spec": spec}}, default=str))


def test_a_saved_run_simulated_again_with_its_profile_gives_the_numbers_it_saved(engine):
    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    spec = "fixed,input=12,output=5,rate=40,num=6,seed=3"
    requests = serving_requests(spec, engine.model_config.vocab_size, engine.max_model_len)
    saved = _saved(compare_run(engine, profile, requests, repeats=1, warmup=False, quiet_wait_s=0.0,
                               decode_lookahead=True), "serving", spec)
    assert saved["simulation"]["decode_lookahead"] is True and saved["simulation"]["streamed"] is True
    again = resimulate(saved, "serving", engine.model_config, profile)
    assert again["inferred"] == []
    for key in ("output_throughput", "ttft_s_p50", "tpot_s_p50", "makespan_s"):
        assert again[key]["measured"] == saved[key]["measured"]
        assert again[key]["simulated"] == pytest.approx(saved[key]["simulated"], rel=1e-12)
    # Another profile moves only the simulated side.
    slower = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    slower.step_overhead_s += 0.01
    moved = resimulate(saved, "serving", engine.model_config, slower)
    assert moved["tpot_s_p50"]["simulated"] > again["tpot_s_p50"]["simulated"]
    assert moved["tpot_s_p50"]["measured"] == saved["tpot_s_p50"]["measured"]


def test_an_offline_run_saved_without_settings_or_workload_gets_them_inferred_and_named(engine):
    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    requests = offline_requests("5,20,4", engine.model_config.vocab_size)
    saved = _saved(compare_run(engine, profile, requests, repeats=1, warmup=False, quiet_wait_s=0.0,
                               streamed=False), "offline", "5,20,4")
    settings, workload = saved.pop("simulation"), saved.pop("workload")
    with pytest.raises(ValueError, match="--offline"):
        resimulate(saved, "offline", engine.model_config, profile)
    guessed = inferred_settings(saved, streamed=False)
    assert guessed["max_num_batched_tokens"] == max(step["num_tokens"] for step in saved["run_steps"]["step_checks"])
    assert guessed["decode_lookahead"] is settings["decode_lookahead"] is False
    assert guessed["lookahead_prompts"] is False and guessed["streamed"] is False
    again = resimulate(saved, "offline", engine.model_config, profile, workload["spec"])
    assert again["inferred"] == ["settings", "workload"]
    # Five 20-token prompts fit one step under the saved 2048-token budget and the guessed 100: same schedule.
    assert again["ttft_s_p50"]["simulated"] == pytest.approx(saved["ttft_s_p50"]["simulated"], rel=1e-9)


def test_inferred_settings_read_the_lookahead_from_queued_steps():
    def step(tokens, rows, queued):
        return {"num_tokens": tokens, "queued": queued, "sequences": rows}

    decode_only = {"run_steps": {"step_checks": [step(300, [[300, 0, 1, 0]], False), step(2, [[1, 300, 1, 0]] * 2, True)]}}
    expected = {"decode_lookahead": True, "lookahead_prompts": False, "max_num_batched_tokens": 300, "metered": False}
    assert inferred_settings(decode_only, True).items() >= expected.items()
    with_prompts = {"run_steps": {"step_checks": [step(40, [[1, 9, 1, 0], [39, 0, 1, 0]], True)]}, "energy_j": {}}
    assert inferred_settings(with_prompts, True)["lookahead_prompts"] is True
    assert inferred_settings(with_prompts, True)["metered"] is True
    with pytest.raises(ValueError, match="settings"):
        inferred_settings({}, True)


def test_offline_spec_errors_name_the_option():
    with pytest.raises(ValueError, match="--offline"):
        offline_requests("5,20", 100)


def test_the_validation_plot_draws_steps_and_run_errors(tmp_path):
    from joule.perf.validate import StepCheck
    from joule.perf.validation_plots import plot_validation

    checks = [StepCheck("s", kind, 1, tokens, measured, measured * 1.05)
              for kind, tokens, measured in (("prefill", 300, 0.02), ("decode", 4, 0.003), ("mixed", 90, 0.01))]
    runs = {"offline": {"output_throughput": {"error": 0.04}, "ttft_s_p50": {"error": -0.2}}, "serving": None}
    path = plot_validation({"steps": checks, "offline": checks[:1], "serving": []}, runs, tmp_path / "v.png", "t")
    assert path.exists() and path.stat().st_size > 10_000


def test_recheck_from_the_command_line_reads_and_writes_compressed_reports(engine, tmp_path):
    """`joule perf validate --recheck` on a saved .json.gz: steps re-predicted, runs simulated again, the report
    written compressed (a GPU validation's JSON is too large to bring back otherwise) and the plot drawn."""
    import gzip

    from joule.perf.cli import main
    from joule.perf.json_files import write_json

    profile = DeviceProfile.from_hardware(get_hardware("CPU-2core"), "float32")
    profile_path = tmp_path / "profile.json"
    profile.save(profile_path)
    spec = "5,20,4"
    saved = compare_run(engine, profile, offline_requests(spec, engine.model_config.vocab_size), repeats=1,
                        warmup=False, quiet_wait_s=0.0, streamed=False)
    report_path = str(tmp_path / "validation.json.gz")
    write_json(report_path, {"offline": saved | {"workload": {"kind": "offline", "spec": spec}}})
    out = tmp_path / "recheck.json.gz"
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(TINY_LLAMA))
    assert main(["perf", "validate", "--profile", str(profile_path), "--model", str(model_dir), "--recheck",
                 report_path, "--output-json", str(out), "--plot", str(tmp_path / "v.png")]) == 0
    with gzip.open(out, "rt", encoding="utf-8") as handle:
        rechecked = json.load(handle)
    run = rechecked["offline"]["run"]
    assert run["inferred"] == [] and run["ttft_s_p50"]["simulated"] == pytest.approx(saved["ttft_s_p50"]["simulated"])
    assert rechecked["offline"]["steps"]["steps"] == len(saved["run_steps"]["step_checks"])
    assert (tmp_path / "v.png").exists()
