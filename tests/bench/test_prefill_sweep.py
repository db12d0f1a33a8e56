"""benchmarks/gpu/prefill_sweep.py on the CPU (Triton's interpreter, tiny steps, two launches): every launch's output
matches the default's, the tiles it builds ahead satisfy the kernel wrapper, and its FLOP count is the causal one."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from helpers.markers import interpreted_triton_on_cpu
from helpers.scripts import BENCHMARKS, load_script

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernels are defined
pytest.importorskip("triton", reason="triton is not installed")
sys.path.insert(0, str(BENCHMARKS / "gpu"))
sweep = load_script(BENCHMARKS / "gpu" / "prefill_sweep.py", "prefill_sweep")


def test_causal_flops_count_each_new_rows_keys():
    # one prompt of 3 new rows: 1 + 2 + 3 keys; a chunk of 2 rows after 4 cached tokens: 5 + 6 keys
    assert sweep.causal_flops([(0, 3)], 2, 8) == 4 * 6 * 2 * 8
    assert sweep.causal_flops([(4, 2)], 2, 8) == 4 * 11 * 2 * 8


@interpreted_triton_on_cpu
def test_every_launch_matches_the_default_on_tiny_steps(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(sweep, "STEPS", (("tiny", 4, 2, 16, [(0, 20), (7, 9)]),))
    monkeypatch.setattr(sweep, "LAUNCHES", [dict(block_m=16, block_n=16, num_warps=4, num_stages=2),
                                            dict(block_m=32, block_n=16, num_warps=4, num_stages=2)])
    monkeypatch.setattr(sweep, "prefill_config", lambda group, head_dim, dtype: dict(
        block_m=16, block_n=16, num_warps=4, num_stages=2))
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["prefill_sweep.py", str(out)])
    sweep.main()
    import json

    rows = json.loads(out.read_text())
    assert len(rows) == 2 and rows[0]["default"] and all(row["max_diff"] < 1e-2 for row in rows)
    assert "tiny: default" in capsys.readouterr().out
