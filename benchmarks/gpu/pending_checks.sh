#!/usr/bin/env bash
# The GPU checks the last sessions could not run, in one device call (~7 minutes on an H200):
#   1. the fair policy (keep-up, the default) at 40 and 67.1 heavy req/s, with the server's request and step logs
#      replayed in the simulator at the end of each probe (is the heavy tenant's TTFT gap slower steps or other ones?);
#   2. a fresh calibration of this GPU (the fit fix and the host probe are in), validated on a new grid beside the
#      shipped profile.
# Usage (repository root, joule importable): OUT=/some/dir bash benchmarks/gpu/pending_checks.sh [fair|perf|all]
# Every step has its own timeout, so one that hangs leaves the others their time; big JSON is gzipped.
# DRY=1 prints the commands instead of running them.
set -u
RUN=""
[[ ${DRY:-0} == 1 ]] && RUN="echo"
OUT=${OUT:?set OUT to a directory for the results}
WHAT=${1:-all}
MODEL=benchmarks/configs/llama-3.2-1b
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}

if [[ $WHAT == all || $WHAT == fair ]]; then
  for RATE in 40 67.1; do
    $RUN timeout 170 python benchmarks/gpu/fairness_probe.py --out "$OUT/fair_$RATE" --heavy-rate "$RATE" \
      --duration-s 20 --py-spy "" > "$OUT/fair_$RATE.log" 2>&1
    echo "fair $RATE: exit $? ($(grep SUMMARY "$OUT/fair_$RATE.log" || echo 'no summary'))"
  done
fi

if [[ $WHAT == all || $WHAT == perf ]]; then
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
