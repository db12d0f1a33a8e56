"""What `joule bench serve` sends: rate sweeps, tenants, length specs, SLOs, arrivals and ShareGPT prompts."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from joule.bench.serve_workload import (
    TenantSpec,
    WorkloadOptions,
    dataset_entries,
    parse_rates,
    plan_run,
    read_sharegpt,
    request_counts,
    tenant_rates,
    word_count,
)
from joule.bench.workload import LengthDistribution, arrival_times
from joule.perf.metrics import SLO


def test_rates_parse_as_a_sweep_with_inf():
    assert parse_rates("1,2, 4,inf") == [1.0, 2.0, 4.0, math.inf]
    assert parse_rates("0.5") == [0.5]
    for bad, word in (("", "at least one"), ("1,x", "'x'"), ("0", "positive"), ("-2", "positive")):
        with pytest.raises(ValueError, match=word):
            parse_rates(bad)


def test_length_specs_parse_with_the_sharegpt_preset_per_role():
    assert LengthDistribution.parse("128") == LengthDistribution("fixed", 128)
    assert LengthDistribution.parse("uniform:32:512") == LengthDistribution("uniform", 32, 512)
    assert LengthDistribution.parse("lognormal:256:1.0").high == 1.0
    assert LengthDistribution.parse("sharegpt", "input").low == 256
    assert LengthDistribution.parse("sharegpt", "output").low == 192
    for bad, word in (("uniform:9:3", "LO <= HI"), ("poisson:3", "expected N"), ("abc", "cannot parse"),
                      ("0", ">= 1"), ("lognormal:100:-1", "sigma")):
        with pytest.raises(ValueError, match=word):
            LengthDistribution.parse(bad)


def test_tenant_specs_parse_and_name_the_bad_item():
    light = TenantSpec.parse("light:rate=0.5,ttft=1.0,tpot=50ms")
    assert (light.name, light.rate, light.slo) == ("light", 0.5, SLO(1.0, 0.05))
    heavy = TenantSpec.parse("heavy:share=3,input=uniform:512:1024,output=sharegpt,num=40")
    assert heavy.rate is None and heavy.share == 3 and heavy.num == 40
    assert heavy.input_len == LengthDistribution("uniform", 512, 1024) and heavy.output_len.low == 192
    assert TenantSpec.parse("plain") == TenantSpec("plain")
    for bad, word in (("a b:rate=1", "tenant name"), ("x:rate=1,share=2", "not both"), ("x:speed=3", "speed"),
                      ("x:rate=fast", "rate=fast"), ("x:ttft=-1", "positive"), ("x:num=0", "num"),
                      ("x:input=uniform:5", "input=uniform:5"), ("x:rate", "KEY=VALUE")):
        with pytest.raises(ValueError, match=word):
            TenantSpec.parse(bad)


def test_slo_parse_and_merge():
    slo = SLO.parse("ttft=2,tpot=40ms")
    assert slo == SLO(2.0, 0.04) and slo.is_set and not SLO().is_set
    assert SLO(tpot_s=0.01).merged_over(slo) == SLO(2.0, 0.01)
    with pytest.raises(ValueError, match="e2e"):
        SLO.parse("e2e=3")


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_arrivals_have_the_asked_rate_and_burstiness(cv):
    times = arrival_times(20000, 4.0, "gamma", cv, np.random.default_rng(7))
    gaps = np.diff(times)
    assert times[0] == 0.0 and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.08)


def test_poisson_and_infinite_rates():
    gaps = np.diff(arrival_times(8000, 5.0, "poisson", 1.0, np.random.default_rng(3)))
    assert gaps.mean() == pytest.approx(0.2, rel=0.05) and gaps.std() == pytest.approx(0.2, rel=0.08)
    assert arrival_times(4, math.inf, "gamma", 2.0, np.random.default_rng(0)).tolist() == [0.0] * 4
    with pytest.raises(ValueError, match="burstiness"):
        arrival_times(4, 1.0, "gamma", 0.0, np.random.default_rng(0))


def test_tenant_rates_and_counts():
    tenants = [TenantSpec("light", rate=0.5), TenantSpec("a", share=1), TenantSpec("b", share=3)]
    assert tenant_rates(tenants, 8.0) == [0.5, 2.0, 6.0]
    assert request_counts(tenants, [0.5, 2.0, 6.0], 34, None) == [2, 8, 24]  # proportional to rates
    assert request_counts(tenants, [0.5, 2.0, 6.0], 0, 10.0) == [5, 20, 60]  # rate x duration
    flood = [TenantSpec("light", rate=2.0), TenantSpec("heavy", rate=math.inf, num=50)]
    assert request_counts(flood, [2.0, math.inf], 10, 5.0) == [10, 50]
    assert request_counts([TenantSpec("x"), TenantSpec("y")], [math.inf, math.inf], 9, None) == [4, 4]


def test_a_run_plan_is_seeded_and_scales_with_the_rate():
    options = WorkloadOptions(num_prompts=30, input_len=LengthDistribution("uniform", 8, 64),
                              output_len=LengthDistribution("lognormal", 16, 1.0), max_model_len=80, seed=4)
    tenants = [TenantSpec("light", rate=1.0, slo=SLO(ttft_s=0.5)), TenantSpec("heavy", share=1.0)]
    slow = plan_run(options, tenants, 2.0, SLO(tpot_s=0.1))
    fast = plan_run(options, tenants, 4.0, SLO(tpot_s=0.1))
    assert [r.send_at for r in slow] == sorted(r.send_at for r in slow)
    assert all(len(r.prompt) == r.prompt_len and r.prompt_len + r.output_len <= 80 for r in slow)
    assert all(1000 <= token < 10000 for r in slow for token in r.prompt)
    light = [r for r in slow if r.tenant == "light"]
    assert light and all(r.slo == SLO(0.5, 0.1) for r in light)
    assert all(r.slo == SLO(None, 0.1) for r in slow if r.tenant == "heavy")
    heavy_slow = [r.send_at for r in slow if r.tenant == "heavy"]
    heavy_fast = [r.send_at for r in fast if r.tenant == "heavy"]
    assert len(heavy_fast) > len(heavy_slow)  # its share of a higher rate, over the same light tenant
    assert heavy_fast[:len(heavy_slow)] == pytest.approx([t / 2 for t in heavy_slow])  # same pattern, twice as fast
    for name in ("light", "heavy"):  # the n-th request of a tenant is the same in every run
        ours, theirs = ([(r.prompt, r.output_len) for r in plan if r.tenant == name] for plan in (slow, fast))
        common = min(len(ours), len(theirs))
        assert common > 0 and ours[:common] == theirs[:common]
    assert [r.prompt for r in slow] == [r.prompt for r in plan_run(options, tenants, 2.0, SLO(tpot_s=0.1))]
    untenanted = plan_run(WorkloadOptions(num_prompts=5, prompt_kind="random-text"), [], math.inf, SLO())
    assert all(r.tenant is None and r.send_at == 0 and len(r.prompt.split()) == 128 for r in untenanted)


def test_prompts_behind_shared_prefixes_take_them_in_turn_and_fit_the_model_length():
    from joule.bench.workload import SharedPrefix

    options = WorkloadOptions(num_prompts=12, input_len=LengthDistribution("uniform", 8, 64),
                              output_len=LengthDistribution("fixed", 40), max_model_len=100, seed=2,
                              prefix=SharedPrefix(32, 3))
    planned = plan_run(options, [], math.inf, SLO())
    assert all(len(r.prompt) == r.prompt_len and r.prompt_len + r.output_len <= 100 for r in planned)
    prefixes = [tuple(r.prompt[:32]) for r in planned]
    assert len(set(prefixes)) == 3 and prefixes[:3] * 4 == prefixes  # request n takes prefix n % 3
    plain = plan_run(WorkloadOptions(num_prompts=12, input_len=LengthDistribution("uniform", 8, 64),
                                     output_len=LengthDistribution("fixed", 40), max_model_len=100 - 32, seed=2),
                     [], math.inf, SLO())
    assert [r.prompt[32:] for r in planned] == [r.prompt for r in plain]  # each prompt's own part as before
    text = plan_run(WorkloadOptions(num_prompts=4, prompt_kind="random-text", prefix=SharedPrefix(5, 1)), [],
                    math.inf, SLO())
    assert len({" ".join(r.prompt.split()[:5]) for r in text}) == 1 and all(r.prompt_len == 133 for r in text)
    with pytest.raises(ValueError, match="groups must be at least 1"):
        SharedPrefix(8, 0)
    with pytest.raises(ValueError, match="not to --dataset"):
        plan_run(options, [], math.inf, SLO(), dataset=[])
    with pytest.raises(ValueError, match="shared prefix"):
        plan_run(WorkloadOptions(max_model_len=20, prefix=SharedPrefix(32, 1)), [], math.inf, SLO())


def test_the_simulators_workload_text_takes_a_shared_prefix_and_keeps_older_specs_requests():
    from joule.perf.arrivals import WorkloadSpec, generate

    spec = WorkloadSpec.parse("input=fixed:20,output=fixed:4,num=6,seed=1,prefix=16,prefix_groups=2")
    requests = generate(spec, 5000)
    assert [len(r.request.prompt_token_ids) for r in requests] == [36] * 6
    assert requests[0].request.prompt_token_ids[:16] == requests[2].request.prompt_token_ids[:16]
    assert requests[0].request.prompt_token_ids[:16] != requests[1].request.prompt_token_ids[:16]
    without = generate(WorkloadSpec.parse("input=fixed:20,output=fixed:4,num=6,seed=1"), 5000)
    assert [r.request.prompt_token_ids[16:] for r in requests] == [r.request.prompt_token_ids for r in without]
    with pytest.raises(ValueError, match="prefix_groups"):
        WorkloadSpec.parse("prefix=16,prefix_groups=0")


def test_sharegpt_file_gives_first_human_prompt_and_gpt_reply(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"id": "1", "conversations": [{"from": "system", "value": "be kind"}, {"from": "human", "value": "hi there"},
                                      {"from": "gpt", "value": "hello to you too"}, {"from": "human", "value": "x"}]},
        {"id": "2", "conversations": [{"from": "human", "value": "only a question"}]},
        {"id": "3", "conversations": [{"from": "human", "value": "long " * 50}, {"from": "gpt", "value": "ok"}]},
    ]))
    pairs = read_sharegpt(path)
    assert pairs[0] == ("hi there", "hello to you too") and len(pairs) == 2
    entries = dataset_entries(pairs, word_count, max_model_len=20)
    assert [(e.prompt, e.prompt_len, e.output_len) for e in entries] == [("hi there", 2, 4)]
    planned = plan_run(WorkloadOptions(num_prompts=3), [], 1.0, SLO(), dataset=entries)
    assert all((r.prompt, r.prompt_len, r.output_len) == ("hi there", 2, 4) for r in planned)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="list of conversations"):
        read_sharegpt(tmp_path / "bad.json")
