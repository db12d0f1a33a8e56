#!/usr/bin/env bash
# The GPU checks the last sessions could not run (all run on the H100 on 2026-12-05 (d), docs/benchmarks.md) (fused ~5, fair ~6, w3 ~2 minutes; a device call takes at most 10):
#   fused: the fused batch-1 attention + o projection kernel (joule/kernels/attention_output.py, off by default):
#          its tests on the GPU, then batch-1 tok/s with it off and on (bs1_ab.py, alternated) and graph replay
#          time by context (short_context_sweep.py --fused);
#   fair:  the fair policy (keep-up, the default) at 40 and 67.1 heavy req/s, with the server's request and step
#          logs replayed in the simulator at the end of each probe;
#   w3:    workload 3 repeated on one engine, step by step (w3_runs_probe.py): why its runs grow 23k -> 35k tok/s;
#   perf:  a fresh calibration of this GPU, validated on a new grid beside the shipped profile (not in "all");
#   next:  what 2026-12-05 (f) left for the next call (~8 minutes, not in "all"): the GEMV kernels' tests on the GPU,
#          then batch 1 with the wider GEMV head (JOULE_GEMV_HEAD_COLUMNS unset, 2048, 8192; bs1_ab.py, alternated),
#          then the decode GEMMs with their weights from DRAM and split-K tiles (decode_gemm_sweep.py); every
#          step's timeout together stays under a call's 600 s;
#   bench: engine_bench.py, the issue's four workloads (~4 minutes, not in "all");
#   pdl:   batch 1 with the next kernel let in before each wait (JOULE_PDL_EARLY_TRIGGER=0,1) crossed with the
#          wider GEMV head (JOULE_GEMV_HEAD_COLUMNS unset, 2048); bs1_ab.py, alternated (~5 minutes, not in "all");
#   splits: decode attention's split count at workload 2's shrinking batches, every count 1-8 against the rule's
#          (decode_sweep.py --splits; ~3 minutes, not in "all").
#   trigger: workloads 3 and 2 with the early PDL trigger off and on (JOULE_PDL_EARLY_TRIGGER=0,1; the default since
#          2026-12-05 (g), measured at batch 1 only): bs1_ab.py --w3 and --w2, one round each (~4 minutes, not in "all");
#   chain: batch 1's GEMV blocks in a 16-layer chain (layer_chain_sweep.py, against the blocks before 2026-12-06 (i))
#          and the device events between two batch-1 replays (step_gaps.py b1) (~2 minutes, not in "all");
#   feed:  batch 1's step boundary (2026-12-06 (i)): kernel tests, graphs == eager in float32 (graphs_check.py),
#          then batch 1 with JOULE_GRAPH_FEED=0,1 x JOULE_TOKEN_COPY_STREAM=0,1 (bs1_ab.py, one round of the four;
#          in (i) crossed with the GEMV blocks before and after) (~3 minutes, not in "all");
#   blas:  the decode and prompt GEMMs under cuBLAS and cuBLASLt (decode_gemm_sweep.py), then workload 3 with
#          TORCH_BLAS_PREFER_CUBLASLT=0,1 (bs1_ab.py --w3, one round) (~5 minutes, not in "all").
#   fusedmlp: the TMA-fed fused gate/up + SiLU GEMM (joule/kernels/gate_up_silu.py, 2026-12-06 (j)): its tests on the
#          GPU, its tiles against cuBLAS + silu_and_mul (gate_up_silu_sweep.py), then workloads 3 and 2 with the best
#          tile at 8,192 rows (JOULE_FUSED_GATE_UP=0,TILE; bs1_ab.py, two rounds / one round) (~6 minutes, not in "all").
#   decoderows: what a workload-3 decode step could still take (2026-12-06 (j)): the fused gate/up + SiLU GEMM's tiles
#          at 16-256 rows against cuBLAS + silu_and_mul (gate_up_silu_sweep.py; the engine uses it from 1,024 rows),
#          and decode attention at 256 x 576 tokens with 2-4 splits beside the launches (decode_sweep.py --w3)
#          (~2 minutes, not in "all").
#   overlap: a workload-3 decode step and a prompt chunk of 512-4,096 rows replayed on two streams at once against
#          one after the other (overlap_probe.py): whether spreading prompts over decode steps could pay; then the
#          fused gate/up GEMMs on fewer processors beside decode attention (--partition), and the other projections
#          through the plain TMA GEMM against cuBLAS (gate_up_silu_sweep.py --plain) (~3 minutes, not in "all").
#   host:  workload 3's host work step by step (w3_step_phases.py: each host phase of every step, the collector's
#          passes), then, where an older source tree was unpacked into ab_old/ before the call (`git archive OLD joule
#          benchmarks/configs | tar -x -C ab_old`; git ignores it: the device call carries it), workloads 3 and 2 from
#          that tree and this one alternated (bs1_ab.py JOULE_TREE=ab_old,., two rounds / one round) (~1 minute, ~5
#          with the A/B; not in "all").
#   prefill: the prefill kernel's 54 launch settings at workload 3's prompt step, a workload-2-like one and one 8k
#          prompt (prefill_sweep.py, 2026-12-06 (k); ~3-5 minutes of compiles, not in "all").
#   b1host: batch 1's host work step by step (w3_step_phases.py --batch-one; 2026-12-06 (l): one host ran batch 1 at
#          79.3 % of the roofline, its eager steps at 59 % of another start's speed): two plain runs' tok/s, then
#          each host phase of every step of an instrumented one (~1 minute, not in "all").
#   queued: the calibration's queued 64-row decode steps under each condition in turn (FINAL_ONLY or DELTA outputs,
#          the energy ledger off or on, plans recorded or not; queued_steps.py): what makes calibration's lookahead
#          steps slower than a run's (docs/perf-model.md (l)) (~1-2 minutes, not in "all").
#   sampling: the fused temperature race (joule/kernels/sample_rows.py, JOULE_FUSED_SAMPLING, off by default since
#          2026-12-06 (l)): its tests on the GPU, then batch 1 at T=0.8 with it off and on (bs1_ab.py --sampled,
#          two rounds) (~3 minutes, not in "all").
#   cold:  workload 3's first run on a fresh engine against the next, phase by phase with each step's device
#          allocations (w3_step_phases.py --cold; a fresh engine's first run was 25.6k tok/s against 35.8k in
#          2026-12-06 (l)), then workload 3 from the CLI beside both transformers peers, as a user runs it
#          (`joule bench throughput ... --compare hf-batch hf --hf-batch-size 64`) (~4 minutes, not in "all").
#   wsfold: (2026-12-06 (p)) the warp-specialized tiles of the fused gate/up GEMM and the residual added inside the
#          o and down projections' GEMMs (JOULE_RESIDUAL_IN_GEMM): the kernel and layer tests on the GPU, the gate/up
#          tiles at 8,192 and 256 rows (gate_up_silu_sweep.py --specialized; with PLAIN=1 the plain projections too), then
#          workload 3 with the default tile and the sweep's best exact warp-specialized or stacked one (FOLD=1: crossed with
#          JOULE_RESIDUAL_IN_GEMM=0,1) (bs1_ab.py --w3, ROUNDS rounds, default 1) (~5-8 minutes, not in "all").
#   stacked: (2026-12-06 (q)) the stacked gate/up tile, the default since (q), measured on an H200 only: the gate/up,
#          tuner and layer tests on the GPU, the Qwen3-0.6B MLP's tiles at 8,192 and 256 rows (gate_up_silu_sweep.py
#          --specialized --model qwen3-0.6b), then workload 3 with it against the two-product tile of before
#          (JOULE_FUSED_GATE_UP=1,128x128x64x8x3x8x1; bs1_ab.py --w3, ROUNDS rounds, default 2; then --w2, one round: the
#          Qwen3-0.6B MLP's stacked tile was never swept) (~5 minutes, not in "all").
#   lastrows: (2026-12-07 (r)) the last layer's output projection and MLP on a step's sampling rows only: its tests on
#          the GPU (chunk graphs, warm-up, the mixed batch against transformers), then workloads 3 and 2 from the tree
#          before it (unpacked into ab_old/ first: `git archive d861bfb~ joule benchmarks/configs | tar -x -C ab_old`)
#          and this one, alternated (bs1_ab.py JOULE_TREE=ab_old,., two rounds / one round) (~7 minutes, not in "all").
#   gap:   (2026-12-07 (t)) workload 3 three ways on one host, to find why it ran 14 % slower inside engine_bench.py's
#          process than from the CLI on a slow host: `joule bench throughput` alone in a fresh process (3 runs), then
#          engine_bench.py --workload-three-only (the bench's engine and order with nothing run before workload 3;
#          its peers after), then the whole engine bench (~8 minutes, not in "all").
# Usage (repository root, joule importable): OUT=/some/dir bash benchmarks/gpu/pending_checks.sh PART... (fused, fair,
# w3, perf, next, bench, pdl, splits, trigger, chain, blas, feed, fusedmlp, decoderows, overlap, host, prefill, b1host,
# queued, sampling, cold, wsfold, stacked, lastrows, gap; "all" is fused fair w3, more than one call's 10 minutes)
# Every step has its own timeout, so one that hangs leaves the others their time; big JSON is gzipped.
# DRY=1 prints the commands instead of running them.
set -u
RUN=""
[[ ${DRY:-0} == 1 ]] && RUN="echo"
OUT=${OUT:?set OUT to a directory for the results}
WHAT=" ${*:-all} "
NOT_IN_ALL=" perf next bench pdl splits trigger chain blas feed fusedmlp decoderows overlap host prefill b1host queued sampling cold wsfold stacked lastrows gap "
wants() { [[ $WHAT == *" all "* && $NOT_IN_ALL != *" $1 "* ]] || [[ $WHAT == *" $1 "* ]]; }
MODEL=benchmarks/configs/llama-3.2-1b
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}

if wants fused; then
  $RUN timeout 120 python -m pytest -q -p no:cacheprovider tests/kernels/test_attention_output.py \
    tests/runtime/test_fused_attention_output.py tests/model/test_row_decode_cuda.py > "$OUT/fused_tests.log" 2>&1
  echo "fused tests: exit $? ($(tail -1 "$OUT/fused_tests.log"))"
  $RUN timeout 200 python benchmarks/gpu/bs1_ab.py "$OUT/bs1_ab" 2 JOULE_FUSED_ATTENTION_OUTPUT=0,1 \
    > "$OUT/bs1_ab.log" 2>&1
  echo "bs1 A/B: exit $?"; tail -4 "$OUT/bs1_ab.log"
  $RUN timeout 150 python benchmarks/gpu/short_context_sweep.py "$OUT/sweep_fused.json" --fused > "$OUT/sweep_fused.log" 2>&1
  echo "sweep: exit $?"; tail -5 "$OUT/sweep_fused.log"
fi

if wants fair; then
  for RATE in 40 67.1; do
    $RUN timeout 170 python benchmarks/gpu/fairness_probe.py --out "$OUT/fair_$RATE" --heavy-rate "$RATE" \
      --duration-s 20 --py-spy "" > "$OUT/fair_$RATE.log" 2>&1
    echo "fair $RATE: exit $? ($(grep SUMMARY "$OUT/fair_$RATE.log" || echo 'no summary'))"
  done
fi

if wants w3; then
  $RUN timeout 150 python benchmarks/gpu/w3_runs_probe.py 6 "$OUT/w3_runs_probe.json" > "$OUT/w3_runs_probe.log" 2>&1
  echo "w3 probe: exit $?"; tail -9 "$OUT/w3_runs_probe.log"
  $RUN gzip -f "$OUT/w3_runs_probe.json" 2>/dev/null
fi

if wants next; then
  $RUN timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py tests/kernels/test_qkv_rotary.py \
    tests/model/test_row_decode_cuda.py > "$OUT/gemv_tests.log" 2>&1
  echo "GEMV tests: exit $? ($(tail -1 "$OUT/gemv_tests.log"))"
  $RUN timeout 250 python benchmarks/gpu/bs1_ab.py "$OUT/bs1_head" 2 JOULE_GEMV_HEAD_COLUMNS=,2048,8192 \
    > "$OUT/bs1_head.log" 2>&1
  echo "bs1 head A/B: exit $?"; tail -5 "$OUT/bs1_head.log"
  $RUN timeout 120 python benchmarks/gpu/decode_gemm_sweep.py "$OUT/decode_gemm_sweep.json" \
    > "$OUT/decode_gemm_sweep.log" 2>&1
  echo "decode GEMM sweep: exit $?"; grep -E " 256 " "$OUT/decode_gemm_sweep.log"
  $RUN gzip -f "$OUT/decode_gemm_sweep.json" 2>/dev/null
fi

if wants pdl; then
  $RUN timeout 330 python benchmarks/gpu/bs1_ab.py "$OUT/bs1_pdl" 2 JOULE_PDL_EARLY_TRIGGER=0,1 \
    JOULE_GEMV_HEAD_COLUMNS=,2048 > "$OUT/bs1_pdl.log" 2>&1
  echo "bs1 PDL trigger A/B: exit $?"; tail -6 "$OUT/bs1_pdl.log"
fi

if wants trigger; then
  for WORKLOAD in w3 w2; do
    $RUN timeout 140 python benchmarks/gpu/bs1_ab.py "$OUT/${WORKLOAD}_trigger" 1 "--$WORKLOAD" JOULE_PDL_EARLY_TRIGGER=0,1 \
      > "$OUT/${WORKLOAD}_trigger.log" 2>&1
    echo "$WORKLOAD trigger A/B: exit $?"; tail -3 "$OUT/${WORKLOAD}_trigger.log"
  done
fi

if wants splits; then
  $RUN timeout 200 python benchmarks/gpu/decode_sweep.py --splits "$OUT/decode_splits.json" > "$OUT/decode_splits.log" 2>&1
  echo "decode splits: exit $?"; grep "^splits" "$OUT/decode_splits.log"
fi

if wants chain; then
  $RUN timeout 90 python -m pytest -q -p no:cacheprovider tests/kernels/test_gemv.py tests/kernels/test_qkv_rotary.py \
    tests/model/test_row_decode_cuda.py > "$OUT/gemv_tests.log" 2>&1
  echo "GEMV tests: exit $? ($(tail -1 "$OUT/gemv_tests.log"))"
  $RUN timeout 220 python benchmarks/gpu/layer_chain_sweep.py "$OUT/layer_chain.json" > "$OUT/layer_chain.log" 2>&1
  echo "layer chain sweep: exit $?"; tail -22 "$OUT/layer_chain.log"
  $RUN timeout 100 python benchmarks/gpu/step_gaps.py "$OUT/b1_gaps" b1 1 > "$OUT/b1_gaps.log" 2>&1
  echo "batch-1 gaps: exit $?"; grep -E "plain run|device events|idle" "$OUT/b1_gaps.log" | head -6
fi

if wants feed; then
  $RUN timeout 60 python -m pytest -q -p no:cacheprovider tests/kernels/test_graph_feed.py tests/kernels/test_gemv.py \
    tests/model/test_row_decode_cuda.py > "$OUT/feed_tests.log" 2>&1
  echo "feed and GEMV tests: exit $? ($(tail -1 "$OUT/feed_tests.log"))"
  $RUN timeout 100 python benchmarks/gpu/graphs_check.py > "$OUT/graphs_check.log" 2>&1
  echo "graphs check: exit $? ($(grep "graphs == eager" "$OUT/graphs_check.log"))"
  $RUN timeout 120 python benchmarks/gpu/bs1_ab.py "$OUT/bs1_boundary" 1 JOULE_GRAPH_FEED=0,1 \
    JOULE_TOKEN_COPY_STREAM=0,1 > "$OUT/bs1_boundary.log" 2>&1
  echo "bs1 feed x copy stream A/B: exit $?"; tail -5 "$OUT/bs1_boundary.log"
fi

if wants blas; then
  $RUN timeout 150 python benchmarks/gpu/decode_gemm_sweep.py "$OUT/decode_gemm_sweep.json" > "$OUT/decode_gemm_sweep.log" 2>&1
  echo "decode GEMM sweep: exit $?"; grep -E " (256|8192) " "$OUT/decode_gemm_sweep.log"
  $RUN gzip -f "$OUT/decode_gemm_sweep.json" 2>/dev/null
  $RUN timeout 140 python benchmarks/gpu/bs1_ab.py "$OUT/w3_blas" 1 --w3 TORCH_BLAS_PREFER_CUBLASLT=0,1 > "$OUT/w3_blas.log" 2>&1
  echo "w3 cuBLASLt A/B: exit $?"; tail -3 "$OUT/w3_blas.log"
fi

if wants fusedmlp; then
  $RUN timeout 90 python -m pytest -q -p no:cacheprovider tests/kernels/test_gate_up_silu.py > "$OUT/gate_up_tests.log" 2>&1
  echo "fused gate/up tests: exit $? ($(tail -1 "$OUT/gate_up_tests.log"))"
  $RUN timeout 150 python benchmarks/gpu/gate_up_silu_sweep.py "$OUT/gate_up_silu.json" > "$OUT/gate_up_silu.log" 2>&1
  echo "fused gate/up sweep: exit $?"; grep -E "^gate_up" "$OUT/gate_up_silu.log"
  TILE=$(python -c "import json, sys
rows = [row for row in json.load(open(sys.argv[1])) if row['rows'] == 8192 and 'best' in row]
print(rows[0]['best'] if rows else '1')" "$OUT/gate_up_silu.json" 2>/dev/null || echo 1)
  $RUN timeout 230 python benchmarks/gpu/bs1_ab.py "$OUT/w3_fused" 2 --w3 "JOULE_FUSED_GATE_UP=0,$TILE" > "$OUT/w3_fused.log" 2>&1
  echo "w3 fused gate/up A/B: exit $?"; tail -4 "$OUT/w3_fused.log"
  $RUN timeout 120 python benchmarks/gpu/bs1_ab.py "$OUT/w2_fused" 1 --w2 "JOULE_FUSED_GATE_UP=0,$TILE" > "$OUT/w2_fused.log" 2>&1
  echo "w2 fused gate/up A/B: exit $?"; tail -3 "$OUT/w2_fused.log"
fi

if wants decoderows; then
  $RUN timeout 100 python benchmarks/gpu/gate_up_silu_sweep.py "$OUT/gate_up_decode.json" 16,64,128,256 \
    > "$OUT/gate_up_decode.log" 2>&1
  echo "fused gate/up at decode rows: exit $?"; grep -E "^gate_up" "$OUT/gate_up_decode.log"
  $RUN timeout 120 python benchmarks/gpu/decode_sweep.py --w3 "$OUT/decode_w3.json" > "$OUT/decode_w3.log" 2>&1
  echo "decode w3 sweep: exit $?"; grep "^w3" "$OUT/decode_w3.log" | head -8
fi

if wants overlap; then
  $RUN timeout 150 python benchmarks/gpu/overlap_probe.py "$OUT/overlap_probe.json" > "$OUT/overlap_probe.log" 2>&1
  echo "overlap probe: exit $?"; grep -E "^(decode|prompt)" "$OUT/overlap_probe.log"
  $RUN timeout 150 python benchmarks/gpu/overlap_probe.py --partition "$OUT/overlap_partition.json" \
    > "$OUT/overlap_partition.log" 2>&1
  echo "overlap partition probe: exit $?"; grep -E "^partition" "$OUT/overlap_partition.log"
  $RUN timeout 100 python benchmarks/gpu/gate_up_silu_sweep.py --plain "$OUT/tma_linear.json" > "$OUT/tma_linear.log" 2>&1
  echo "plain TMA GEMM sweep: exit $?"; grep -E "^plain" "$OUT/tma_linear.log"
fi

if wants host; then
  $RUN timeout 150 python benchmarks/gpu/w3_step_phases.py "$OUT/w3_step_phases.json" > "$OUT/w3_step_phases.log" 2>&1
  echo "w3 step phases: exit $?"; grep -E "^(plain|instrumented|steps)" "$OUT/w3_step_phases.log"
  if [[ -d ab_old/joule || -n $RUN ]]; then
    $RUN timeout 200 python benchmarks/gpu/bs1_ab.py "$OUT/w3_code" 2 --w3 JOULE_TREE=ab_old,. > "$OUT/w3_code.log" 2>&1
    echo "w3 code A/B: exit $?"; tail -3 "$OUT/w3_code.log"
    $RUN timeout 150 python benchmarks/gpu/bs1_ab.py "$OUT/w2_code" 1 --w2 JOULE_TREE=ab_old,. > "$OUT/w2_code.log" 2>&1
    echo "w2 code A/B: exit $?"; tail -3 "$OUT/w2_code.log"
  fi
fi

if wants lastrows; then
  $RUN timeout 150 python -m pytest -q -p no:cacheprovider tests/runtime/test_cuda_graphs.py \
    tests/runtime/test_kernel_warmup.py tests/runtime/test_executor_sampling.py tests/model/test_architectures.py \
    > "$OUT/lastrows_tests.log" 2>&1
  echo "tests: exit $? ($(tail -1 "$OUT/lastrows_tests.log"))"
  if [[ -d ab_old/joule || -n $RUN ]]; then
    $RUN timeout 230 python benchmarks/gpu/bs1_ab.py "$OUT/w3_lastrows" 2 --w3 JOULE_TREE=ab_old,. \
      > "$OUT/w3_lastrows.log" 2>&1
    echo "w3 A/B: exit $?"; tail -3 "$OUT/w3_lastrows.log"
    $RUN timeout 170 python benchmarks/gpu/bs1_ab.py "$OUT/w2_lastrows" 1 --w2 JOULE_TREE=ab_old,. \
      > "$OUT/w2_lastrows.log" 2>&1
    echo "w2 A/B: exit $?"; tail -3 "$OUT/w2_lastrows.log"
  else
    echo "no ab_old/joule: A/B skipped"
  fi
fi

if wants b1host; then
  $RUN timeout 120 python benchmarks/gpu/w3_step_phases.py "$OUT/b1_step_phases.json" --batch-one \
    > "$OUT/b1_step_phases.log" 2>&1
  echo "b1 step phases: exit $?"; grep -E "^(plain|instrumented|steps)" "$OUT/b1_step_phases.log"
fi
if wants queued; then
  $RUN timeout 150 python benchmarks/gpu/queued_steps.py "$OUT/queued_steps.json" > "$OUT/queued_steps.log" 2>&1
  echo "queued steps: exit $?"; grep -E "^(graphs|round)" "$OUT/queued_steps.log"
fi
if wants sampling; then
  $RUN timeout 200 python -m pytest -q -p no:cacheprovider tests/kernels/test_sample_rows.py \
    tests/runtime/test_fused_sampling.py tests/runtime/test_sampler.py > "$OUT/sampling_tests.log" 2>&1
  echo "sampling tests: exit $? ($(tail -1 "$OUT/sampling_tests.log"))"
  $RUN timeout 240 python benchmarks/gpu/bs1_ab.py "$OUT/bs1_sampled" 2 --sampled JOULE_FUSED_SAMPLING=0,1 \
    > "$OUT/bs1_sampled.log" 2>&1
  echo "sampled bs1 A/B: exit $?"; tail -4 "$OUT/bs1_sampled.log"
fi
if wants prefill; then
  $RUN timeout 330 python benchmarks/gpu/prefill_sweep.py "$OUT/prefill_sweep.json" > "$OUT/prefill_sweep.log" 2>&1
  echo "prefill sweep: exit $?"; grep -A1 "default" "$OUT/prefill_sweep.log"
fi

if wants cold; then
  $RUN timeout 150 python benchmarks/gpu/w3_step_phases.py "$OUT/w3_cold.json" --cold > "$OUT/w3_cold.log" 2>&1
  echo "w3 cold: exit $?"; grep -E "instrumented run|longer|^  step|totals, cold" "$OUT/w3_cold.log" | head -40
  $RUN gzip -f "$OUT/w3_cold.json" 2>/dev/null
  $RUN timeout 330 python -m joule.cli bench throughput --model "$MODEL" --load-format dummy --dtype bfloat16 \
    --max-model-len 4096 --num-prompts 256 --input-len 512 --output-len 128 --workload-seed 2 \
    --compare hf-batch hf --hf-batch-size 64 --output-json "$OUT/w3_cli.json" > "$OUT/w3_cli.log" 2>&1
  echo "w3 from the CLI: exit $?"; grep -v "it/s\]\|^INFO\|^WARN" "$OUT/w3_cli.log" | tail -8
fi

if wants gap; then
  $RUN timeout 120 python -m joule.cli bench throughput --model "$MODEL" --load-format dummy --dtype bfloat16 \
    --max-model-len 4096 --num-prompts 256 --input-len 512 --output-len 128 --workload-seed 2 --repeat 3 \
    --output-json "$OUT/w3_alone.json" > "$OUT/w3_alone.log" 2>&1
  echo "w3 alone: exit $?"; grep -v "it/s\]\|^INFO\|^WARN" "$OUT/w3_alone.log" | tail -4
  $RUN timeout 170 python benchmarks/gpu/engine_bench.py "$OUT/engine_bench_w3only.json" --workload-three-only \
    > "$OUT/engine_bench_w3only.log" 2>&1
  echo "engine bench, workload 3 only: exit $?"; tail -6 "$OUT/engine_bench_w3only.log"
  $RUN timeout 240 python benchmarks/gpu/engine_bench.py "$OUT/engine_bench.json" > "$OUT/engine_bench.log" 2>&1
  echo "engine bench: exit $?"; tail -22 "$OUT/engine_bench.log"
fi

if wants bench; then
  $RUN timeout 240 python benchmarks/gpu/engine_bench.py "$OUT/engine_bench.json" > "$OUT/engine_bench.log" 2>&1
  echo "engine bench: exit $?"; tail -22 "$OUT/engine_bench.log"
fi

if wants perf; then
  $RUN timeout 150 python -m joule.cli perf calibrate --model "$MODEL" --load-format dummy --dtype bfloat16 \
    --output "$OUT/profile.json" --measurements "$OUT/measurements.json" > "$OUT/calibrate.log" 2>&1
  echo "calibrate: exit $?"
  $RUN gzip -f "$OUT/measurements.json" 2>/dev/null
  SHIPPED=$(python -c "from joule.perf.measure import detect_hardware
from joule.perf.profile import shipped_profile_path
print(shipped_profile_path(detect_hardware(), 'bfloat16'))")
  for PROFILE in "$OUT/profile.json" "$SHIPPED"; do
    NAME=$(basename "$PROFILE" .json)
    [[ -f $PROFILE || -n $RUN ]] || { echo "no profile $PROFILE"; continue; }
    $RUN timeout 200 python -m joule.cli perf validate --profile "$PROFILE" --model "$MODEL" --load-format dummy \
      --dtype bfloat16 --repeats 3 --grid-seed 37 --offline 64,256,64 --serving "sharegpt,rate=3,num=60,seed=1" \
      --output-json "$OUT/validate_$NAME.json.gz" --plot "$OUT/validate_$NAME.png" > "$OUT/validate_$NAME.log" 2>&1
    echo "validate $NAME: exit $?"
    grep -E "median \|error\||error [+-]" "$OUT/validate_$NAME.log" | head -12
  done
fi

if wants stacked; then
  $RUN timeout 90 python -m pytest -q -p no:cacheprovider tests/kernels/test_gate_up_silu.py \
    tests/runtime/test_gate_up_tuning.py tests/model/test_layers.py > "$OUT/stacked_tests.log" 2>&1
  echo "tests: exit $? ($(tail -1 "$OUT/stacked_tests.log"))"
  $RUN timeout 60 python benchmarks/gpu/gate_up_silu_sweep.py --specialized --model qwen3-0.6b \
    "$OUT/stacked_qwen_sweep.json" 8192,256 > "$OUT/stacked_qwen_sweep.log" 2>&1
  echo "Qwen3-0.6B gate/up sweep: exit $?"; grep -E "cuBLAS|x0x0x1 |best" "$OUT/stacked_qwen_sweep.log"
  $RUN timeout 300 python benchmarks/gpu/bs1_ab.py "$OUT/stacked_ab" "${ROUNDS:-2}" --w3 \
    JOULE_FUSED_GATE_UP=1,128x128x64x8x3x8x1 > "$OUT/stacked_ab.log" 2>&1
  echo "w3 A/B: exit $?"; tail -4 "$OUT/stacked_ab.log"
  $RUN timeout 120 python benchmarks/gpu/bs1_ab.py "$OUT/stacked_w2" 1 --w2 \
    JOULE_FUSED_GATE_UP=1,128x128x64x8x3x8x1 > "$OUT/stacked_w2.log" 2>&1
  echo "w2 A/B: exit $?"; tail -4 "$OUT/stacked_w2.log"
fi

if wants wsfold; then
  $RUN timeout 90 python -m pytest -q -p no:cacheprovider tests/kernels/test_gate_up_silu.py tests/model/test_layers.py \
    > "$OUT/wsfold_tests.log" 2>&1
  echo "tests: exit $? ($(tail -1 "$OUT/wsfold_tests.log"))"
  $RUN timeout 90 python benchmarks/gpu/gate_up_silu_sweep.py --specialized "$OUT/gu_sweep.json" 8192,256 \
    > "$OUT/gu_sweep.log" 2>&1
  echo "gate/up sweep: exit $?"; cat "$OUT/gu_sweep.log"
  if [[ -n ${PLAIN:-} ]]; then
    $RUN timeout 100 python benchmarks/gpu/gate_up_silu_sweep.py --plain "$OUT/plain_sweep.json" 8192 \
      > "$OUT/plain_sweep.log" 2>&1
    echo "plain sweep: exit $?"; grep plain "$OUT/plain_sweep.log"
  fi
  BEST=$(python -c "import json, sys
rows = [row for row in json.load(open('$OUT/gu_sweep.json')) if row['rows'] == 8192]
tiles = rows[0]['tiles'] if rows else {}
specialized = [name for name, tile in tiles.items()
               if (tile['warp_specialize'] or tile.get('stacked')) and tile['max_difference'] < 0.1]
print(min(specialized, key=lambda name: tiles[name]['us']) if specialized else '1')" 2>/dev/null || echo 1)
  echo "warp-specialized tile for the A/B: $BEST"
  $RUN timeout 370 python benchmarks/gpu/bs1_ab.py "$OUT/wsfold_ab" "${ROUNDS:-1}" --w3 \
    ${FOLD:+JOULE_RESIDUAL_IN_GEMM=0,1} "JOULE_FUSED_GATE_UP=1,$BEST" > "$OUT/wsfold_ab.log" 2>&1
  echo "w3 A/B: exit $?"; tail -6 "$OUT/wsfold_ab.log"
  $RUN gzip -f "$OUT/gu_sweep.json" "$OUT/plain_sweep.json" 2>/dev/null
fi
