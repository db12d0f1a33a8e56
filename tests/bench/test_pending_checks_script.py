"""benchmarks/gpu/pending_checks.sh, dry: the commands it would run on the GPU, in order, with their outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.scripts import BENCHMARKS

SCRIPT = BENCHMARKS / "gpu" / "pending_checks.sh"
REPO = BENCHMARKS.parent


def test_the_dry_run_names_every_check_and_where_its_output_goes(tmp_path):
    environment = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHONPATH": str(REPO),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(SCRIPT), "all"], cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines() if line.endswith(("exit 0", "summary)"))] == [
        "fair 40", "fair 67.1", "calibrate", "validate profile", f"validate {_shipped_name()}"]
    probe = (tmp_path / "fair_67.1.log").read_text()
    assert "fairness_probe.py" in probe and "--heavy-rate 67.1" in probe and f"--out {tmp_path}/fair_67.1" in probe
    calibrate = (tmp_path / "calibrate.log").read_text()
    assert "perf calibrate" in calibrate and f"--measurements {tmp_path}/measurements.json" in calibrate
    validate = (tmp_path / "validate_profile.log").read_text()
    assert f"--profile {tmp_path}/profile.json" in validate and "--grid-seed 37" in validate
    assert f"--output-json {tmp_path}/validate_profile.json.gz" in validate


def _shipped_name() -> str:
    from joule.perf.measure import detect_hardware
    from joule.perf.profile import shipped_profile_path

    return shipped_profile_path(detect_hardware(), "bfloat16").stem
