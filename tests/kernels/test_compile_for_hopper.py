"""The batch-1 GEMV kernels (the fused q/k/v + rotary one and the graph feed too) compile for an H100 (sm_90) on a machine without a GPU.

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
    from joule.kernels.graph_feed import _graph_feed_kernel
    feed_signature = {"host_ptr": "*i32", "device_ptr": "*i32", "tokens_ptr": "*i32", "token_words": "i32",
                      **{f"{kind}{index}": "i32" for kind in ("start", "length") for index in range(4)}}
    compile_for_hopper(_graph_feed_kernel, feed_signature, {"HAS_TOKENS": True, "BLOCK": 1024, "USE_PDL": True})
    print("graph feed ok", flush=True)
""")


@pytest.mark.parametrize("early_trigger", ["0", "1"])  # JOULE_PDL_EARLY_TRIGGER, read when the kernels are defined
def test_gemv_kernels_compile_for_hopper_with_any_head(early_trigger):
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    environment["JOULE_PDL_EARLY_TRIGGER"] = early_trigger
    completed = subprocess.run([sys.executable, "-c", COMPILE], env=environment, capture_output=True, text=True,
                               timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.count(" ok") == 10
    order = "early trigger" if early_trigger == "1" else "late trigger"
    assert completed.stdout.count(order) == 10 and completed.stdout.count("trigger") == 10  # the 10 PDL kernels


FUSED_GATE_UP = textwrap.dedent("""
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile
    from joule.kernels.gate_up_silu import _gate_up_silu_kernel

    for block_m, block_n, block_k, warps, stages, flatten in ((128, 128, 64, 8, 3, False), (128, 64, 64, 4, 4, False),
                                                              (128, 128, 64, 8, 3, True)):
        signature = {"x_descriptor": f"tensordesc<bf16[{block_m},{block_k}]>",
                     "weight_descriptor": f"tensordesc<bf16[{block_n},{block_k}]>",
                     "output_descriptor": f"tensordesc<bf16[{block_m},{block_n}]>",
                     "rows": "i32", "intermediate": "i32", "hidden": "i32", "num_programs": "i32"}
        constants = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8, "ELEMENT": tl.bfloat16,
                     "PRECISION": "tf32", "UPCAST": False, "FLATTEN": flatten}
        source = ASTSource(_gate_up_silu_kernel, {**signature, **{name: "constexpr" for name in constants}},
                           constexprs=constants)
        compiled = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = compiled.asm["ptx"]
        # Hopper's path: tiles by tensor-memory bulk copies, products by warpgroup MMAs
        assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx, (block_m, block_n)
        print("fused gate/up", block_m, block_n, "flattened" if flatten else "", "ok", flush=True)
    from joule.kernels.gate_up_silu import _linear_kernel
    signature = {"x_descriptor": "tensordesc<bf16[128,64]>", "weight_descriptor": "tensordesc<bf16[128,64]>",
                 "output_descriptor": "tensordesc<bf16[128,128]>", "rows": "i32", "out_features": "i32",
                 "hidden": "i32", "num_programs": "i32"}
    constants = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "ELEMENT": tl.bfloat16,
                 "PRECISION": "tf32", "UPCAST": False, "FLATTEN": False}
    source = ASTSource(_linear_kernel, {**signature, **{name: "constexpr" for name in constants}}, constexprs=constants)
    ptx = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 4}).asm["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx
    print("plain TMA GEMM ok", flush=True)
    from joule.kernels.gate_up_silu import _gate_up_silu_stacked_kernel
    signature = {"x_descriptor": "tensordesc<bf16[128,64]>", "stacked_descriptor": "tensordesc<bf16[2,128,64]>",
                 "output_descriptor": "tensordesc<bf16[128,128]>", "rows": "i32", "intermediate": "i32",
                 "hidden": "i32", "num_programs": "i32"}
    constants = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "ELEMENT": tl.bfloat16,
                 "PRECISION": "tf32", "UPCAST": False, "FLATTEN": False}
    source = ASTSource(_gate_up_silu_stacked_kernel, {**signature, **{name: "constexpr" for name in constants}},
                       constexprs=constants)
    ptx = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3}).asm["ptx"]
    assert "cp.async.bulk.tensor.3d" in ptx and "wgmma.mma_async.sync.aligned.m64n256k16" in ptx
    print("stacked gate/up ok", flush=True)
    from joule.kernels.gate_up_silu import _gate_up_silu_specialized_kernel, _linear_specialized_kernel, _triton_version
    pointers = {"x_ptr": "*bf16", "weight_ptr": "*bf16", "output_ptr": "*bf16", "rows": "i32"}
    for kernel, columns in ((_gate_up_silu_specialized_kernel, "intermediate"), (_linear_specialized_kernel,
                                                                                "out_features")):
        if columns == "intermediate" and _triton_version() < (3, 7):
            # Triton 3.6's warp-specialization pass fails on the gated kernel; the engine refuses it there too
            print("warp-specialized", columns, "refused below Triton 3.7", flush=True)
            continue
        signature = {**pointers, columns: "i32", "hidden": "i32", "stride_x": "i32", "stride_weight": "i32",
                     "num_programs": "i32"}
        constants = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "ELEMENT": tl.bfloat16,
                     "PRECISION": "tf32", "UPCAST": False, "FLATTEN": False}
        source = ASTSource(kernel, {**signature, **{name: "constexpr" for name in constants}}, constexprs=constants)
        compiled = compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 3})
        ptx = compiled.asm["ptx"]
        # warp specialized: a producer and two consumer warpgroups, their registers rebalanced
        assert compiled.metadata.num_warps == 12 and "setmaxnreg" in ptx and "wgmma.mma_async" in ptx, kernel
        print("warp-specialized", columns, "ok", flush=True)
""")


def test_the_tma_gemm_kernels_compile_for_hopper_with_tma_and_wgmma():
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    completed = subprocess.run([sys.executable, "-c", FUSED_GATE_UP], env=environment, capture_output=True, text=True,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    from joule.kernels.gate_up_silu import _triton_version

    assert completed.stdout.count(" ok") == (7 if _triton_version() >= (3, 7) else 6), completed.stdout
