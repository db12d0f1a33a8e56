"""benchmarks/gpu/pending_checks.sh, dry: the commands it would run on the GPU, in order, with their outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.scripts import BENCHMARKS

SCRIPT = BENCHMARKS / "gpu" / "pending_checks.sh"
REPO = BENCHMARKS.parent


def _dry_run(tmp_path, *parts: str) -> list[str]:
    """The checks a dry run reports, in order (the lines ending in an exit status or a summary)."""
    environment = {**os.environ, "DRY": "1", "OUT": str(tmp_path), "PYTHONPATH": str(REPO),
                   "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(["bash", str(SCRIPT), *parts], cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return [line.split(":")[0] for line in result.stdout.splitlines() if line.endswith(("exit 0", "summary)"))]


def test_all_runs_the_fused_kernel_fairness_and_workload_three_checks(tmp_path):
    assert _dry_run(tmp_path, "all") == ["bs1 A/B", "sweep", "fair 40", "fair 67.1", "w3 probe"]
    tests = (tmp_path / "fused_tests.log").read_text()
    assert "tests/kernels/test_attention_output.py" in tests and "test_row_decode_cuda.py" in tests
    ab = (tmp_path / "bs1_ab.log").read_text()
    assert "bs1_ab.py" in ab and "JOULE_FUSED_ATTENTION_OUTPUT=0,1" in ab
    probe = (tmp_path / "fair_67.1.log").read_text()
    assert "fairness_probe.py" in probe and "--heavy-rate 67.1" in probe and f"--out {tmp_path}/fair_67.1" in probe
    assert f"w3_runs_probe.py 6 {tmp_path}/w3_runs_probe.json" in (tmp_path / "w3_runs_probe.log").read_text()


def test_next_runs_the_gemv_tests_the_head_ab_and_the_gemm_sweep(tmp_path):
    # the tests' line ends in their summary, not an exit status
    assert _dry_run(tmp_path, "next") == ["bs1 head A/B", "decode GEMM sweep"]
    assert "tests/kernels/test_gemv.py" in (tmp_path / "gemv_tests.log").read_text()
    ab = (tmp_path / "bs1_head.log").read_text()
    assert f"bs1_ab.py {tmp_path}/bs1_head 2" in ab and "JOULE_GEMV_HEAD_COLUMNS=,2048,8192" in ab
    assert f"decode_gemm_sweep.py {tmp_path}/decode_gemm_sweep.json" in (tmp_path / "decode_gemm_sweep.log").read_text()


def test_pdl_runs_the_trigger_and_head_ab(tmp_path):
    assert _dry_run(tmp_path, "pdl") == ["bs1 PDL trigger A/B"]
    ab = (tmp_path / "bs1_pdl.log").read_text()
    assert "JOULE_PDL_EARLY_TRIGGER=0,1" in ab and "JOULE_GEMV_HEAD_COLUMNS=,2048" in ab


def test_trigger_runs_workloads_three_and_two_with_the_trigger_off_and_on(tmp_path):
    assert _dry_run(tmp_path, "trigger") == ["w3 trigger A/B", "w2 trigger A/B"]
    for workload in ("w3", "w2"):
        ab = (tmp_path / f"{workload}_trigger.log").read_text()
        assert f"bs1_ab.py {tmp_path}/{workload}_trigger 1 --{workload} JOULE_PDL_EARLY_TRIGGER=0,1" in ab


def test_splits_and_bench_run_alone_or_together(tmp_path):
    assert _dry_run(tmp_path, "splits", "bench") == ["decode splits", "engine bench"]
    assert f"decode_sweep.py --splits {tmp_path}/decode_splits.json" in (tmp_path / "decode_splits.log").read_text()
    assert f"engine_bench.py {tmp_path}/engine_bench.json" in (tmp_path / "engine_bench.log").read_text()


def test_chain_feed_and_blas_run_the_batch_one_and_gemm_checks(tmp_path):
    assert _dry_run(tmp_path, "chain") == ["layer chain sweep", "batch-1 gaps"]
    assert f"layer_chain_sweep.py {tmp_path}/layer_chain.json" in (tmp_path / "layer_chain.log").read_text()
    assert f"step_gaps.py {tmp_path}/b1_gaps b1 1" in (tmp_path / "b1_gaps.log").read_text()
    assert _dry_run(tmp_path, "feed") == ["bs1 feed x copy stream A/B"]  # the tests' and graphs' lines end in results
    assert "tests/kernels/test_graph_feed.py" in (tmp_path / "feed_tests.log").read_text()
    assert "graphs_check.py" in (tmp_path / "graphs_check.log").read_text()
    ab = (tmp_path / "bs1_boundary.log").read_text()
    assert "JOULE_GRAPH_FEED=0,1" in ab and "JOULE_TOKEN_COPY_STREAM=0,1" in ab
    assert _dry_run(tmp_path, "blas") == ["decode GEMM sweep", "w3 cuBLASLt A/B"]
    assert "--w3 TORCH_BLAS_PREFER_CUBLASLT=0,1" in (tmp_path / "w3_blas.log").read_text()


def test_parts_run_alone_or_together(tmp_path):
    assert _dry_run(tmp_path, "fair") == ["fair 40", "fair 67.1"]
    assert _dry_run(tmp_path, "fused", "w3") == ["bs1 A/B", "sweep", "w3 probe"]
    assert _dry_run(tmp_path, "perf") == ["calibrate", "validate profile", f"validate {_shipped_name()}"]
    calibrate = (tmp_path / "calibrate.log").read_text()
    assert "perf calibrate" in calibrate and f"--measurements {tmp_path}/measurements.json" in calibrate
    validate = (tmp_path / "validate_profile.log").read_text()
    assert f"--profile {tmp_path}/profile.json" in validate and "--grid-seed 37" in validate
    assert f"--output-json {tmp_path}/validate_profile.json.gz" in validate


def _shipped_name() -> str:
    from joule.perf.measure import detect_hardware
    from joule.perf.profile import shipped_profile_path

    return shipped_profile_path(detect_hardware(), "bfloat16").stem



def test_fusedmlp_tests_sweeps_then_runs_workloads_three_and_two_with_the_best_tile(tmp_path):
    assert _dry_run(tmp_path, "fusedmlp") == ["fused gate/up sweep", "w3 fused gate/up A/B", "w2 fused gate/up A/B"]
    assert "tests/kernels/test_gate_up_silu.py" in (tmp_path / "gate_up_tests.log").read_text()
    assert f"gate_up_silu_sweep.py {tmp_path}/gate_up_silu.json" in (tmp_path / "gate_up_silu.log").read_text()
    # no sweep results in a dry run: the default tile ("1")
    assert f"bs1_ab.py {tmp_path}/w3_fused 2 --w3 JOULE_FUSED_GATE_UP=0,1" in (tmp_path / "w3_fused.log").read_text()
    assert f"bs1_ab.py {tmp_path}/w2_fused 1 --w2 JOULE_FUSED_GATE_UP=0,1" in (tmp_path / "w2_fused.log").read_text()


def test_decoderows_sweeps_the_fused_gemm_at_decode_rows_and_the_w3_decode_step(tmp_path):
    assert _dry_run(tmp_path, "decoderows") == ["fused gate/up at decode rows", "decode w3 sweep"]
    assert (f"gate_up_silu_sweep.py {tmp_path}/gate_up_decode.json 16,64,128,256"
            in (tmp_path / "gate_up_decode.log").read_text())
    assert f"decode_sweep.py --w3 {tmp_path}/decode_w3.json" in (tmp_path / "decode_w3.log").read_text()


def test_overlap_runs_the_two_stream_probe(tmp_path):
    assert _dry_run(tmp_path, "overlap") == ["overlap probe", "overlap partition probe", "plain TMA GEMM sweep"]
    assert f"gate_up_silu_sweep.py --plain {tmp_path}/tma_linear.json" in (tmp_path / "tma_linear.log").read_text()
    assert f"overlap_probe.py {tmp_path}/overlap_probe.json" in (tmp_path / "overlap_probe.log").read_text()
    assert (f"overlap_probe.py --partition {tmp_path}/overlap_partition.json"
            in (tmp_path / "overlap_partition.log").read_text())


def test_host_runs_the_step_phases_then_the_code_ab_against_the_unpacked_tree(tmp_path):
    assert _dry_run(tmp_path, "host") == ["w3 step phases", "w3 code A/B", "w2 code A/B"]
    assert f"w3_step_phases.py {tmp_path}/w3_step_phases.json" in (tmp_path / "w3_step_phases.log").read_text()
    for workload, rounds in (("w3", 2), ("w2", 1)):
        ab = (tmp_path / f"{workload}_code.log").read_text()
        assert f"bs1_ab.py {tmp_path}/{workload}_code {rounds} --{workload} JOULE_TREE=ab_old,." in ab


def test_prefill_runs_the_prefill_launch_sweep(tmp_path):
    assert _dry_run(tmp_path, "prefill") == ["prefill sweep"]
    assert f"prefill_sweep.py {tmp_path}/prefill_sweep.json" in (tmp_path / "prefill_sweep.log").read_text()


def test_b1host_runs_the_step_phases_at_batch_one(tmp_path):
    assert _dry_run(tmp_path, "b1host") == ["b1 step phases"]
    assert (f"w3_step_phases.py {tmp_path}/b1_step_phases.json --batch-one"
            in (tmp_path / "b1_step_phases.log").read_text())


def test_queued_times_the_calibrations_queued_steps_under_each_condition(tmp_path):
    assert _dry_run(tmp_path, "queued") == ["queued steps"]
    assert f"queued_steps.py {tmp_path}/queued_steps.json" in (tmp_path / "queued_steps.log").read_text()


def test_sampling_tests_the_fused_race_then_ab_tests_it_at_batch_one(tmp_path):
    assert _dry_run(tmp_path, "sampling") == ["sampled bs1 A/B"]  # the tests' line ends in their summary
    assert "tests/kernels/test_sample_rows.py" in (tmp_path / "sampling_tests.log").read_text()
    assert (f"bs1_ab.py {tmp_path}/bs1_sampled 2 --sampled JOULE_FUSED_SAMPLING=0,1"
            in (tmp_path / "bs1_sampled.log").read_text())


def test_stacked_tests_sweeps_qwen_then_alternates_the_stacked_and_two_product_tiles(tmp_path):
    assert _dry_run(tmp_path, "stacked") == ["Qwen3-0.6B gate/up sweep", "w3 A/B", "w2 A/B"]
    tests = (tmp_path / "stacked_tests.log").read_text()
    assert "tests/kernels/test_gate_up_silu.py" in tests and "tests/runtime/test_gate_up_tuning.py" in tests
    sweep = (tmp_path / "stacked_qwen_sweep.log").read_text()
    assert f"--specialized --model qwen3-0.6b {tmp_path}/stacked_qwen_sweep.json 8192,256" in sweep
    two_product = "JOULE_FUSED_GATE_UP=1,128x128x64x8x3x8x1"
    assert f"bs1_ab.py {tmp_path}/stacked_ab 2 --w3 {two_product}" in (tmp_path / "stacked_ab.log").read_text()
    assert f"bs1_ab.py {tmp_path}/stacked_w2 1 --w2 {two_product}" in (tmp_path / "stacked_w2.log").read_text()


def test_lastrows_tests_then_alternates_the_tree_before_and_this_one(tmp_path):
    assert _dry_run(tmp_path, "lastrows") == ["w3 A/B", "w2 A/B"]  # the tests' line ends in their summary
    tests = (tmp_path / "lastrows_tests.log").read_text()
    assert "tests/runtime/test_cuda_graphs.py" in tests and "tests/model/test_architectures.py" in tests
    assert f"bs1_ab.py {tmp_path}/w3_lastrows 2 --w3 JOULE_TREE=ab_old,." in (tmp_path / "w3_lastrows.log").read_text()
    assert f"bs1_ab.py {tmp_path}/w2_lastrows 1 --w2 JOULE_TREE=ab_old,." in (tmp_path / "w2_lastrows.log").read_text()


def test_gap_runs_workload_three_alone_then_in_the_bench_without_and_with_the_runs_before_it(tmp_path):
    assert _dry_run(tmp_path, "gap") == ["w3 alone", "engine bench, workload 3 only", "engine bench"]
    alone = (tmp_path / "w3_alone.log").read_text()
    assert "bench throughput" in alone and "--workload-seed 2 --repeat 3" in alone and "--compare" not in alone
    only = (tmp_path / "engine_bench_w3only.log").read_text()
    assert f"engine_bench.py {tmp_path}/engine_bench_w3only.json --workload-three-only" in only
    assert f"engine_bench.py {tmp_path}/engine_bench.json" in (tmp_path / "engine_bench.log").read_text()
