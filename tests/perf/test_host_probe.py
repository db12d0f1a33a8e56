"""The host probe: a fixed piece of scheduler work, recorded by calibration and compared by validation."""

from __future__ import annotations

import dataclasses
import json

from joule.perf.calibrate import Measurements, fit_profile, merge_measurements
from joule.perf.host_probe import describe, host_probe_seconds
from joule.perf.profile import DeviceProfile
from joule.perf.step_model import StepModel
from tests.perf.test_calibration_fit import _true_profile, model_config, synthetic_measurements


def test_the_probe_times_a_fixed_simulation_and_the_line_says_which_host_is_faster():
    seconds = host_probe_seconds(repeats=2)
    assert 0 < seconds < 30
    assert "2.00x as fast" in describe(0.05, 0.10)  # half the time: twice the speed
    assert "0.50x as fast" in describe(0.10, 0.05)
    assert "predates the probe" in describe(0.05, None)


def test_calibration_keeps_the_probe_through_saving_merging_and_fitting(tmp_path):
    config = model_config()
    measured = synthetic_measurements(config, StepModel(config, _true_profile(config)))
    probed = dataclasses.replace(measured, host_probe_s=0.08)
    again = Measurements.from_dict(json.loads(json.dumps(dataclasses.asdict(probed))))
    assert again.host_probe_s == 0.08
    older = dict(dataclasses.asdict(measured))
    del older["host_probe_s"]  # a file saved before the probe
    assert Measurements.from_dict(json.loads(json.dumps(older))).host_probe_s == 0.0
    merged = merge_measurements([probed, dataclasses.replace(measured, host_probe_s=0.06), measured])
    assert merged.host_probe_s == 0.06  # the fastest run, as every other merged measurement
    profile = fit_profile(config, probed)
    assert profile.host_probe_s == 0.08
    path = tmp_path / "profile.json"
    profile.save(path)
    assert DeviceProfile.load(path).host_probe_s == 0.08
    assert fit_profile(config, measured).host_probe_s is None
