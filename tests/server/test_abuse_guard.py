"""The abuse guard: per-tenant token budgets over a sliding minute, the max_tokens cap, and their 429/400s."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from joule.llm_engine import LLMEngine
from joule.server.abuse_guard import (
    ANONYMOUS_TENANT,
    AbuseGuard,
    AbuseGuardConfig,
    OverBudgetError,
)
from joule.server.app import ServerConfig, build_app


class ManualClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rejected_counts(metrics_text: str) -> dict[str, float]:
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(metrics_text)
        for sample in family.samples
        if sample.name == "joule_requests_rejected_total"
    }


# -- the guard on its own ---------------------------------------------------------------------------
def test_tenant_at_its_token_budget_is_refused_until_the_window_frees_enough():
    clock = ManualClock()
    guard = AbuseGuard(AbuseGuardConfig(tenant_token_budget=100), clock=clock)
    guard.check("alice")  # nothing used yet
    guard.charge("alice", 60, 0.0)
    clock.advance(10)
    guard.charge("alice", 50, 0.0)  # 110 >= 100: over
    guard.check("bob")  # another tenant is untouched
    with pytest.raises(OverBudgetError) as refused:
        guard.check("alice")
    assert refused.value.reason == "tenant_token_budget"
    # dropping the first charge (60 tokens, made 10 s ago) brings alice to 50 < 100: 50 s from now
    assert refused.value.retry_after_seconds == 50
    assert "alice" in str(refused.value) and "110 tokens" in str(refused.value)
    clock.advance(49.5)
    with pytest.raises(OverBudgetError) as still:
        guard.check("alice")
    assert still.value.retry_after_seconds == 1  # 0.5 s left, rounded up
    clock.advance(0.5)
    guard.check("alice")
    assert guard.usage("alice") == (50, 0.0)
    clock.advance(10)
    assert guard.usage("alice") == (0, 0.0)


def test_energy_budget_names_its_reason_and_both_budgets_wait_for_the_later():
    clock = ManualClock()
    guard = AbuseGuard(AbuseGuardConfig(tenant_token_budget=10, tenant_energy_budget=5.0), clock=clock)
    guard.charge("t", 3, 6.0)  # over on joules only
    with pytest.raises(OverBudgetError) as refused:
        guard.check("t")
    assert refused.value.reason == "tenant_energy_budget" and refused.value.retry_after_seconds == 60
    clock.advance(30)
    guard.charge("t", 20, 0.5)  # now over on tokens too; tokens free only when this charge expires
    with pytest.raises(OverBudgetError) as both:
        guard.check("t")
    assert both.value.reason == "tenant_token_budget" and both.value.retry_after_seconds == 60


def test_no_budgets_means_no_refusals_and_no_bookkeeping():
    guard = AbuseGuard(AbuseGuardConfig())
    guard.charge("t", 10**9, 10**9)
    guard.check("t")
    assert guard.usage("t") == (0, 0.0)


def test_tenants_that_went_quiet_are_forgotten():
    clock = ManualClock()
    guard = AbuseGuard(AbuseGuardConfig(tenant_token_budget=5), clock=clock)
    for index in range(50):
        guard.charge(f"tenant-{index}", 1, 0.0)
    clock.advance(61)
    guard.charge("fresh", 1, 0.0)
    assert guard.num_tracked_tenants == 1 and guard.usage("fresh") == (1, 0.0)


def test_max_tokens_cap_default_and_limit():
    guard = AbuseGuard(AbuseGuardConfig(max_tokens_cap=100))
    assert guard.limit_max_tokens(None) == 100
    assert guard.limit_max_tokens(100) == 100 and guard.limit_max_tokens(7) == 7
    assert guard.limit_max_tokens(500, explicit=False) == 100  # a server default is lowered, not refused
    with pytest.raises(ValueError, match="max_completion_tokens is 101"):
        guard.limit_max_tokens(101, param="max_completion_tokens")
    assert AbuseGuard(AbuseGuardConfig(max_tokens_cap=None)).limit_max_tokens(None) is None
    assert AbuseGuardConfig().max_tokens_cap == 4096
    assert AbuseGuard.tenant_of(None) == AbuseGuard.tenant_of("") == ANONYMOUS_TENANT


@pytest.mark.parametrize("field, value", [("tenant_token_budget", 0), ("tenant_token_budget", 2.5),
                                          ("tenant_energy_budget", -1.0), ("tenant_energy_budget", float("inf")),
                                          ("max_tokens_cap", 0), ("window_seconds", 0)])
def test_invalid_guard_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        AbuseGuardConfig(**{field: value})


# -- through the app ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return LLMEngine.from_kwargs(model=str(tiny_model_dir), max_model_len=256, kv_cache_memory_bytes=8 * 2**20,
                                 dtype="float32")


def guarded_app(engine, clock, **guard_options):
    return build_app(engine, ServerConfig(served_model_names=["tiny"], abuse_guard=AbuseGuardConfig(**guard_options)),
                     clock=clock)


def test_tenant_over_its_token_budget_gets_429_while_another_is_served(engine):
    clock = ManualClock()
    with TestClient(guarded_app(engine, clock, tenant_token_budget=20)) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", max_retries=0, http_client=http)
        heavy = client.completions.create(model="tiny", prompt="flood", max_tokens=20, user="heavy",
                                          extra_body={"ignore_eos": True})
        used = heavy.usage.prompt_tokens + heavy.usage.completion_tokens
        assert used >= 20
        assert http.app.state.abuse_guard.usage("heavy")[0] == used  # charged what it really used
        clock.advance(15)
        with pytest.raises(openai.RateLimitError) as refused:
            client.completions.create(model="tiny", prompt="more", max_tokens=2, user="heavy")
        assert refused.value.response.headers["Retry-After"] == "45"
        error = refused.value.body
        assert error["type"] == "rate_limit_error" and error["code"] == "tenant_token_budget"
        assert "heavy" in error["message"]
        light = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=3, user="light")
        assert light.choices[0].message.content is not None
        clock.advance(45)  # the heavy tenant's charge has left the window
        again = client.completions.create(model="tiny", prompt="back", max_tokens=2, user="heavy")
        assert again.usage.completion_tokens >= 1
        assert rejected_counts(http.get("/metrics").text) == {"tenant_token_budget": 1.0}


def test_requests_without_user_share_the_anonymous_tenant(engine):
    clock = ManualClock()
    with TestClient(guarded_app(engine, clock, tenant_token_budget=10)) as http:
        body = {"prompt": "nobody", "max_tokens": 12, "ignore_eos": True}
        assert http.post("/v1/completions", json=body).status_code == 200
        refused = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) == 60
        assert "'anonymous'" in refused.json()["error"]["message"]
        assert http.post("/v1/completions", json={**body, "user": "named"}).status_code == 200


def test_max_tokens_cap_applies_to_omitted_and_refuses_larger(engine):
    with TestClient(guarded_app(engine, ManualClock(), max_tokens_cap=6)) as http:
        chat = {"messages": [{"role": "user", "content": "talk"}], "ignore_eos": True}
        reply = http.post("/v1/chat/completions", json=chat).json()
        assert reply["usage"]["completion_tokens"] == 6 and reply["choices"][0]["finish_reason"] == "length"
        completion = http.post("/v1/completions", json={"prompt": "go", "ignore_eos": True}).json()
        assert completion["usage"]["completion_tokens"] == 6  # completions' default of 16, lowered to the cap
        for path, body, param in [("/v1/chat/completions", {**chat, "max_tokens": 7}, "max_tokens"),
                                  ("/v1/chat/completions", {**chat, "max_completion_tokens": 7}, "max_completion_tokens"),
                                  ("/v1/completions", {"prompt": "go", "max_tokens": 7}, "max_tokens")]:
            response = http.post(path, json=body)
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == param and "cap of 6" in error["message"]
        assert http.post("/v1/completions", json={"prompt": "go", "max_tokens": 6}).status_code == 200


def test_default_cap_leaves_short_context_requests_alone(engine):
    with TestClient(build_app(engine, ServerConfig(served_model_names=["tiny"]))) as http:
        chat = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": None, "ignore_eos": True}
        reply = http.post("/v1/chat/completions", json=chat)
        assert reply.status_code == 200  # the 4096 default is clamped to the 256-token context, not refused
        assert reply.json()["choices"][0]["finish_reason"] == "length"
