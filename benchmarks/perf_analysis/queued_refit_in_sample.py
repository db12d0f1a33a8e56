"""In-sample check of the queued-step fit: the shipped H200 calibration plus the queued steps of a saved validation
(call 7, docs/perf-model.md (f)) refitted, and the median errors before and after. Fits on validation data: it shows
whether the model can express those steps, not how well it predicts new ones. Usage: python <this file> (no GPU)."""

import gzip, json, statistics, dataclasses
import numpy as np
from joule.perf.calibrate import Measurements, fit_profile
from joule.perf.measure import StepSample
from joule.perf.validate import checks_from_report
from joule.perf.step_model import StepModel
from joule.model.config import ModelConfig
cfg = ModelConfig.from_file('benchmarks/configs/llama-3.2-1b/config.json')
measured = Measurements.from_dict(json.load(open('joule/perf/profiles/h200-bfloat16.measurements.json')))
val = json.load(gzip.open('benchmarks/gpu/h200_2026-12-04f/h200-bfloat16.validation-seed19.json.gz'))
queued = []
for name in ('offline', 'serving'):
    for c in checks_from_report(val[name]['run_steps']):
        if c.shape.queued:
            queued.append(StepSample(name, c.shape, c.measured_s, c.measured_s))
# thin the serving steps (16k) to a few hundred, keeping the mix
rng = np.random.default_rng(0)
offline_q = [s for s in queued if s.scenario == 'offline']
serving_q = [s for s in queued if s.scenario == 'serving']
sample = offline_q + [serving_q[i] for i in rng.choice(len(serving_q), 200, replace=False)]
base = fit_profile(cfg, measured)
with_q = fit_profile(cfg, dataclasses.replace(measured, steps=measured.steps + sample))
for label, prof in (("plain", base), ("with queued", with_q)):
    m = StepModel(cfg, prof)
    def err(steps): return np.median([abs(m.predict(s.shape).elapsed_seconds / s.seconds - 1) for s in steps])
    print(f"{label:12} step_overhead {prof.step_overhead_s*1e3:.3f} ms seq {prof.sequence_overhead_s*1e6:.1f} us "
          f"layer {prof.layer_overhead_s*1e6:.1f} us lin_dec {prof.scales['linear_decode']:.3f} | "
          f"calib {err(measured.steps):.3f} offline-q {err(offline_q):.3f} serving-q {err(serving_q):.3f}")
