"""One factor on a profile's host terms: applied (``DeviceProfile.with_host_scale``), fitted to measured steps
(``joule.perf.host_scale``) and reached from the command line (no torch needed)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from joule.perf.batch_shape import BatchShape, SequenceWork
from joule.perf.cli import CONFIG_DIR, load_model_config, main
from joule.perf.host_scale import SCALE_GRID, fit_host_scale
from joule.perf.json_files import write_json
from joule.perf.profile import HOST_TERMS, resolve_profile
from joule.perf.step_model import StepModel
from joule.perf.validate import StepCheck, summarize_checks


def gpu_profile(**changes):
    """The shipped H100 profile with every host term non-zero, so a scale shows in each."""
    profile = resolve_profile("H100", "bfloat16")
    return dataclasses.replace(profile, **{name: getattr(profile, name) or 1e-5 for name in HOST_TERMS}, **changes)


def shapes() -> list[BatchShape]:
    decode = [BatchShape([SequenceWork(1, context, True) for _ in range(rows)])
              for rows, context in ((1, 100), (8, 300), (64, 300), (192, 600))]
    queued = [dataclasses.replace(shape, queued=True) for shape in decode[:3]]
    prompts = [BatchShape.prefill([500]), BatchShape.prefill([700] * 6),
               BatchShape([SequenceWork(1, 300, True)] * 16 + [SequenceWork(400, 0, True)])]
    return decode + queued + prompts


def test_with_host_scale_moves_the_host_terms_and_leaves_device_time():
    profile = gpu_profile(layer_overhead_s=4e-6, chunk_pass_layer_overhead_s=3e-6)
    slower = profile.with_host_scale(1.5)
    for name in HOST_TERMS:
        assert getattr(slower, name) == pytest.approx(1.5 * getattr(profile, name))
    assert profile.graph_layer_overhead_on_device
    for name in ("layer_overhead_s", "chunk_pass_layer_overhead_s", "gemm_flops", "memory_bandwidth"):
        assert getattr(slower, name) == getattr(profile, name)
    assert slower.scales == profile.scales
    # Where the per-layer term is launches (no graph replays), it is host work too.
    eager = dataclasses.replace(profile, graph_layer_overhead_on_device=False).with_host_scale(2.0)
    assert eager.layer_overhead_s == pytest.approx(8e-6) and eager.chunk_pass_layer_overhead_s == 3e-6
    assert profile.with_host_scale(1.0) == profile


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), float("nan"), "2"])
def test_with_host_scale_rejects_what_is_not_a_positive_number(bad):
    with pytest.raises(ValueError, match="host_scale"):
        gpu_profile().with_host_scale(bad)


@pytest.mark.parametrize("true_scale", [0.7, 1.0, 1.6, 2.3])
def test_fit_finds_the_factor_steps_were_measured_with(true_scale):
    """Steps 'measured' on a host ``true_scale`` times as slow: the fit recovers it within a grid step, and its
    error is far below the unscaled profile's wherever the hosts differ."""
    model_config = load_model_config("llama-3.2-1b")
    profile = gpu_profile()
    truth = StepModel(model_config, profile.with_host_scale(true_scale))
    model = StepModel(model_config, profile)
    checks = [StepCheck.of("grid", shape, truth.predict(shape).elapsed_seconds, model) for shape in shapes()]
    fit = fit_host_scale(checks, model_config, profile)
    assert fit.scale == pytest.approx(true_scale, rel=0.026)
    assert fit.median_abs_error < 0.01
    if true_scale != 1.0:
        assert fit.unscaled_median_abs_error > 5 * fit.median_abs_error
    assert f"x{fit.scale:.2f}" in fit.describe()


def test_fit_needs_steps_and_prefers_one_among_equals():
    model_config = load_model_config("llama-3.2-1b")
    with pytest.raises(ValueError, match="no measured steps"):
        fit_host_scale([], model_config, gpu_profile())
    # No host terms at all: every factor fits alike, and the profile as it is wins.
    bare = dataclasses.replace(gpu_profile(), **{name: 0.0 for name in HOST_TERMS})
    model = StepModel(model_config, bare)
    checks = [StepCheck.of("grid", shape, model.predict(shape).elapsed_seconds * 1.1, model) for shape in shapes()]
    assert fit_host_scale(checks, model_config, bare).scale == 1.0 and 1.0 in SCALE_GRID


def test_simulate_host_scale_slows_a_host_bound_run_and_rejects_bad_values(tmp_path, capsys):
    makespans = []
    for scale in ("1", "3"):
        output = tmp_path / f"run{scale}.json"
        assert main(["simulate", "--model", "llama-3.2-1b", "--hardware", "H100", "--no-decode-lookahead",
                     "--workload", "input=fixed:64,output=fixed:32,num=8", "--host-scale", scale,
                     "--output-json", str(output)]) == 0
        makespans.append(json.loads(output.read_text())[0]["makespan_s"])
    assert makespans[1] > makespans[0]
    for bad in ("0", "-2", "fast"):
        with pytest.raises(SystemExit):
            main(["simulate", "--model", "llama-3.2-1b", "--host-scale", bad])
        assert "--host-scale" in capsys.readouterr().err


def test_validate_recheck_prints_and_saves_the_fitted_host_scale(tmp_path, capsys):
    model_config = load_model_config("llama-3.2-1b")
    profile = gpu_profile()
    profile_path = tmp_path / "profile.json"
    profile.save(profile_path)
    truth = StepModel(model_config, profile.with_host_scale(1.6))
    model = StepModel(model_config, profile)
    checks = [StepCheck.of("grid", shape, truth.predict(shape).elapsed_seconds, model) for shape in shapes()]
    report = tmp_path / "validation.json"
    write_json(report, {"steps": summarize_checks(checks)})
    out = tmp_path / "recheck.json"
    assert main(["perf", "validate", "--profile", str(profile_path), "--model", str(CONFIG_DIR / "llama-3.2-1b"), "--recheck",
                 str(report), "--output-json", str(out)]) == 0
    assert "host terms x1.60 fit these steps best" in capsys.readouterr().out
    fitted = json.loads(out.read_text())["steps"]["steps"]["host_scale"]
    assert fitted["scale"] == pytest.approx(1.6, rel=0.026) and fitted["median_abs_error"] < 0.01
    # The same report rechecked with that factor applied: the profile already fits, x1.00 is best.
    assert main(["perf", "validate", "--profile", str(profile_path), "--model", str(CONFIG_DIR / "llama-3.2-1b"), "--recheck",
                 str(report), "--host-scale", str(fitted["scale"])]) == 0
    assert "host terms x1.00 fit these steps best" in capsys.readouterr().out
