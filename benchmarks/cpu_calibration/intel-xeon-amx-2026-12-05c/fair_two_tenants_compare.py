"""Per-request TTFT of a two-tenant `fair` run: simulated vs a `joule serve` request log, same workload (seed 3).

Usage: python fair_two_tenants_compare.py REQUESTS.jsonl[.gz] MODEL_DIR
(the log of `joule serve --scheduling-policy fair --request-log F` under `joule bench serve --num-prompts 80
--tenant light:rate=0.5,input=fixed:64,output=fixed:8 --tenant heavy:rate=1.5,input=uniform:256:1024,output=fixed:16
--seed 3`; its first record is the bench's warm-up request). See docs/perf-model.md, 2026-12-05 (h).
"""
import gzip, json, sys, statistics as st
from joule.bench.serve_workload import TenantSpec
from joule.perf.arrivals import WorkloadSpec, tenant_requests
from joule.perf.cli import load_model_config
from joule.perf.simulator import ClusterSimulator, ReplicaConfig
M = sys.argv[2]
model = load_model_config(M)
workload = WorkloadSpec.parse("num=80,seed=3,rate=inf")
tenants = [TenantSpec.parse(t) for t in ("light:rate=0.5,input=fixed:64,output=fixed:8", "heavy:rate=1.5,input=uniform:256:1024,output=fixed:16")]
requests = tenant_requests(workload, tenants, model.vocab_size, 8192, None)
replica = ReplicaConfig.for_hardware("CPU-2core", "joule/perf/profiles/cpu-2core-bfloat16.json", "bfloat16",
    max_num_batched_tokens=2048, num_kv_blocks=5825, scheduling_policy="fair", fair_keep_up=True)
sim = ClusterSimulator(model, [replica], "least_loaded", streamed_outputs=True)
result = sim.run(requests)
recs = sorted(result.records, key=lambda r: r.arrival_time)
opener = gzip.open if sys.argv[1].endswith(".gz") else open
log = sorted([json.loads(l) for l in opener(sys.argv[1], "rt")], key=lambda r: r["arrival"])
log = [r for r in log if r["tenant"] in ("light", "heavy")][1:]
t0 = log[0]["arrival"]
print(len(recs), len(log))
rows = []
for s, m in zip(recs, log):
    rows.append((s.tenant, s.prompt_len, m["prompt_tokens"], s.arrival_time - recs[0].arrival_time, m["arrival"] - t0,
                 (s.first_token_time - s.arrival_time) * 1e3, (m["first_token"] - m["arrival"]) * 1e3, (m["first_scheduled"]-m["arrival"])*1e3))
for r in rows[:40]:
    print("%-6s %5d %5d  arr sim %6.2f meas %6.2f   ttft sim %6.0f meas %6.0f (queue %5.0f)" % r)
for t in ("light", "heavy"):
    sel = [r for r in rows if r[0] == t]
    print(t, "sim p50 %.0f meas p50 %.0f" % (st.median(r[5] for r in sel), st.median(r[6] for r in sel)))
