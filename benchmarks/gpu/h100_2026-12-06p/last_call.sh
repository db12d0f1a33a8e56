date; nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=.
timeout 50 python -m pytest -q -p no:cacheprovider tests/kernels/test_gate_up_silu.py -k "warp_specialized or engine_sizes" > $OUT/tests.log 2>&1; echo "tests exit $?: $(tail -1 $OUT/tests.log)"
timeout 45 python benchmarks/gpu/gate_up_silu_sweep.py --specialized $OUT/gu_sweep.json 8192 > $OUT/gu_sweep.log 2>&1; cat $OUT/gu_sweep.log
BEST=$(python -c "import json
tiles = json.load(open('$OUT/gu_sweep.json'))[0]['tiles']
good = [n for n, t in tiles.items() if t['warp_specialize'] and t['max_difference'] < 0.1]
print(min(good, key=lambda n: tiles[n]['us']) if good else '')" 2>/dev/null)
echo "best exact specialized: $BEST"
[[ -n $BEST ]] && timeout 100 python benchmarks/gpu/bs1_ab.py $OUT/ab 1 --w3 "JOULE_FUSED_GATE_UP=1,$BEST" > $OUT/ab.log 2>&1; tail -4 $OUT/ab.log
