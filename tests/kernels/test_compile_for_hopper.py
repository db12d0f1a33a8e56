"""The batch-1 GEMV kernels and the fused gate/up GEMM compile for an H100 (sm_90) on a machine without a GPU.

Why: the CPU interpreter runs a kernel's Python, not Triton's compiler, so a kernel can pass every interpreter test
and still fail to compile on the GPU (a loop-carried value whose shape changes did, 2026-12-05 (f)). Triton compiles
to a cubin for a named target with no device present; each case is a configuration the engine launches. The
compiles run in a child process: this test session's kernels are the interpreter's (``conftest.py``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed")

COMPILE = textwrap.dedent("""
    import sys
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from joule.kernels.gate_up_silu import PROMPT_TILE, SMALL_TILE, _gate_up_silu_kernel
    from joule.kernels.gemv import _gemv_kernel
    from joule.kernels.qkv_rotary import _qkv_rotary_kernel

    def compile_for_hopper(kernel, signature, constants, num_warps=4, num_stages=1):
        signature = {**signature, **{name: "constexpr" for name in constants}}
        source = ASTSource(kernel, signature, constexprs=constants)
        compiled = compile(source, target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
        assert len(compiled.asm["cubin"]) > 0
        ptx = compiled.asm["ptx"]
        if constants.get("USE_PDL"):  # where the next kernel may launch: after this one's wait, or with the switch before
            trigger, wait = ptx.index("griddepcontrol.launch_dependents"), ptx.index("griddepcontrol.wait")
            print("early trigger" if trigger < wait else "late trigger", flush=True)

    gemv_signature = {"x_ptr": "*bf16", "weight_ptr": "*bf16", "bias_ptr": "*bf16", "out_ptr": "*bf16", "N": "i32",
                      "stride_weight": "i32", "residual_ptr": "*bf16", "norm_weight_ptr": "*bf16",
                      "residual_out_ptr": "*bf16", "eps": "fp32"}
    for tiles in (0, 2, 8):
        for gated in (False, True):
            compile_for_hopper(_gemv_kernel, gemv_signature, {
                "K": 2048, "HAS_BIAS": False, "BLOCK_N": 4, "BLOCK_K": 256, "PREFETCH_TILES": tiles, "USE_PDL": True,
                "NORM": gated, "HAS_RESIDUAL": gated, "K_PAD": 2048, "GATED": gated, "L2_LINES": 0})
            print("gemv", tiles, gated, "ok", flush=True)
    compile_for_hopper(_gemv_kernel, gemv_signature, {  # down's one-row programs, the whole row before the wait
        "K": 8192, "HAS_BIAS": False, "BLOCK_N": 1, "BLOCK_K": 512, "PREFETCH_TILES": 16, "USE_PDL": True,
        "NORM": False, "HAS_RESIDUAL": False, "K_PAD": 8192, "GATED": False, "L2_LINES": 0}, num_stages=3)
    print("gemv down 16 ok", flush=True)
    qkv_signature = {name: "*bf16" for name in ("x_ptr", "weight_ptr", "bias_ptr", "residual_ptr", "norm_weight_ptr",
                                                "residual_out_ptr", "query_out_ptr", "key_cache_ptr",
                                                "value_cache_ptr")}
    qkv_signature.update({"eps": "fp32", "cos_ptr": "*fp32", "sin_ptr": "*fp32", "slot_mapping_ptr": "*i64",
                          "stride_weight": "i32", "stride_cache_block": "i32", "stride_cache_offset": "i32",
                          "stride_cache_head": "i32"})
    for tiles in (1, 4):
        compile_for_hopper(_qkv_rotary_kernel, qkv_signature, {
            "K": 2048, "NUM_QUERY_HEADS": 32, "NUM_KV_HEADS": 8, "HEAD_DIM": 64, "PAIRS": 2, "BLOCK_K": 512,
            "PREFETCH_TILES": tiles, "USE_PDL": True, "NORM": True, "HAS_RESIDUAL": True, "K_PAD": 2048,
            "HAS_BIAS": False, "BLOCK_SIZE": 16, "SATURATE": False, "L2_LINES": 0}, num_stages=3)
        print("qkv_rotary", tiles, "ok", flush=True)
    gate_up_signature = {"x_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "rows": "i32",
                         "intermediate": "i32", "hidden": "i32", "stride_x": "i32", "stride_weight": "i32",
                         "stride_out": "i32"}
    for block_m, block_n, block_k, warps, stages, group in (PROMPT_TILE, SMALL_TILE):
        compile_for_hopper(_gate_up_silu_kernel, gate_up_signature, {
            "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group, "PRECISION": "tf32",
            "UPCAST": False}, num_warps=warps, num_stages=stages)
        print("gate_up_silu", block_m, block_n, "ok", flush=True)
""")


@pytest.mark.parametrize("early_trigger", ["0", "1"])  # JOULE_PDL_EARLY_TRIGGER, read when the kernels are defined
def test_gemv_kernels_compile_for_hopper_with_any_head(early_trigger):
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["JOULE_PDL_EARLY_TRIGGER"] = early_trigger
    completed = subprocess.run([sys.executable, "-c", COMPILE], env=environment, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count(" ok") == 11
    order = "early trigger" if early_trigger == "1" else "late trigger"
    assert completed.stdout.count(order) == 9 and completed.stdout.count("trigger") == 9  # the 9 PDL kernels


DECODE_WARM = textwrap.dedent("""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from joule.kernels.paged_decode import _decode_partial_kernel

    signature = {name: "*bf16" for name in ("query_ptr", "key_cache_ptr", "value_cache_ptr", "output_ptr",
                                            "warm_first_ptr", "warm_second_ptr", "warm_third_ptr")}
    signature.update({name: "*i32" for name in ("block_tables_ptr", "sequence_lengths_ptr", "sequence_ids_ptr",
                                                "query_start_locations_ptr")})
    signature.update({"partial_output_ptr": "*fp32", "partial_lse_ptr": "*fp32", "scale_log2": "fp32"})
    signature.update({name: "i32" for name in (
        "min_split_length", "num_splits", "warm_first_bytes", "warm_second_bytes", "warm_third_bytes",
        "stride_query_token", "stride_query_head", "stride_output_token", "stride_output_head", "stride_cache_block",
        "stride_cache_offset", "stride_cache_head", "stride_table_sequence")})
    constants = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=64, HEAD_DIM_PAD=64, BLOCK_SIZE=16, BLOCK_N=128,
                     DIRECT_OUTPUT=False, HAS_SEQUENCE_IDS=False, DOT_PRECISION="tf32", UPCAST_DOT=False,
                     FP16_DOT=False, FP8_ASM=False, HEADS_FIRST=False, USE_PDL=True, PREFETCH_LINES=1,
                     LINE_ELEMENTS=64, WARM_LANES=128)
    for warm in (False, True):
        source = ASTSource(_decode_partial_kernel, {**signature, **{name: "constexpr" for name in constants},
                                                    "WARM": "constexpr"}, constexprs={**constants, "WARM": warm})
        compiled = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
        ptx = compiled.asm["ptx"]
        prefetches = ptx.count("cp.async.bulk.prefetch.L2.global")
        before_wait = prefetches > 0 and ptx.index("cp.async.bulk.prefetch.L2") < ptx.index("griddepcontrol.wait")
        print("warm" if warm else "plain", prefetches, "before wait" if before_wait else "-", flush=True)
""")


def test_decode_attention_warms_l2_before_its_wait_only_when_asked():
    """JOULE_L2_WARM_MB: one bulk prefetch per range (three), issued before the PDL wait; none without it."""
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", DECODE_WARM], env=environment, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "plain 0 -" in completed.stdout
    assert "warm 3 before wait" in completed.stdout
