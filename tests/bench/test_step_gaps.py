"""benchmarks/gpu/step_gaps.py's trace analysis on a hand-made Chrome trace: gaps, their launch kind and host."""

from __future__ import annotations

from helpers.scripts import BENCHMARKS, load_script

step_gaps = load_script(BENCHMARKS / "gpu" / "step_gaps.py", "step_gaps")


def kernel(name: str, ts: float, dur: float, correlation: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": correlation}}


def host(name: str, ts: float, dur: float, category: str = "user_annotation", **args) -> dict:
    return {"ph": "X", "cat": category, "name": name, "ts": ts, "dur": dur, "args": args}


def test_gaps_are_found_sized_and_attributed():
    trace = {"traceEvents": [
        host("step", 0, 200), host("launch prompt 0+8192", 5, 50), host("collect", 120, 60),
        host("cuLaunchKernelEx", 10, 2, "cuda_driver", correlation=1),
        host("cuLaunchKernelEx", 12, 2, "cuda_driver", correlation=2),
        host("cudaGraphLaunch", 130, 2, "cuda_runtime", correlation=3),
        kernel("gemm", 20, 40, 1),
        kernel("norm", 50, 20, 2),     # overlaps the GEMM: no gap, busy counted once
        kernel("attention", 150, 10, 3),  # 80 us after the norm ended: one gap, launched while collecting
    ]}
    result = step_gaps.analyse(trace)
    assert result["kernels"] == 3
    assert result["span_us"] == 140 and result["busy_us"] == 60
    assert result["gaps"] == 1 and result["idle_us"] == 80
    (gap,) = result["largest"]
    assert gap["after"] == "norm" and gap["before"] == "attention" and gap["kind"] == "collect"
    assert gap["host"] == ["step"]  # mid-gap (110 us) only the step range is open
    assert result["idle_by_launch_kind"] == {"collect": 80}
    assert [row["name"] for row in result["by_kernel"]] == ["gemm", "norm", "attention"]
    # the tail in order, each with its gap from the latest end before it (negative: it overlapped, as under PDL)
    assert [(event["name"], event["gap"]) for event in result["sequence"]] == [
        ("gemm", 0.0), ("norm", -10.0), ("attention", 80.0)]
    assert [event["at"] for event in result["sequence"]] == [0, 30, 130]


def test_small_gaps_are_ignored_and_an_empty_trace_says_so():
    trace = {"traceEvents": [kernel("a", 0, 10, 1), kernel("b", 12, 10, 2)]}
    result = step_gaps.analyse(trace)
    assert result["gaps"] == 0 and result["busy_us"] == 20 and result["span_us"] == 22
    assert step_gaps.analyse({"traceEvents": []}) == {"kernels": 0}
