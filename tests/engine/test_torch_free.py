"""The scheduler, block manager and simulator must run where torch is not installed."""

from __future__ import annotations

import subprocess
import sys


def test_engine_core_and_simulator_import_no_torch():
    code = (
        "import sys\n"
        "import joule.engine.core, joule.engine.scheduler, joule.engine.kv_blocks, joule.engine.policies\n"
        "import joule.perf.simulator, joule.perf.planner, joule.perf.step_model\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
