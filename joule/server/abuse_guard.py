"""Per-tenant budgets against energy-latency attacks: tokens and joules per sliding minute, a max_tokens cap.

An energy-latency attack sends inputs crafted to make the model generate for as long as it may, so
one client burns the machine's time and energy. The guard bounds what a tenant (the API's ``user``;
requests without one share the ``anonymous`` tenant) may use per sliding window (60 s):

* requests are charged when they finish or are aborted, with the prompt tokens plus the tokens
  generated and the joules the engine attributed to them (so a request is never refused for what
  it *might* use, only for what its tenant already used);
* a request is refused (HTTP 429) only while its tenant is at or over a budget, with the seconds
  until enough of the window's charges expire to bring it back under (``Retry-After``);
* requests that omit ``max_tokens`` get at most ``max_tokens_cap``; asking for more is a 400.

The clock is injectable so tests can move time by hand. ``check`` runs on the event loop and
``charge`` on the engine thread, hence the lock.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

ANONYMOUS_TENANT = "anonymous"
DEFAULT_MAX_TOKENS_CAP = 4096
DEFAULT_WINDOW_SECONDS = 60.0


@dataclass(frozen=True)
class AbuseGuardConfig:
    """Budgets per tenant per window; None means no limit of that kind."""

    tenant_token_budget: int | None = None  # prompt + generated tokens per window
    tenant_energy_budget: float | None = None  # joules per window
    max_tokens_cap: int | None = DEFAULT_MAX_TOKENS_CAP  # default and ceiling of max_tokens
    window_seconds: float = DEFAULT_WINDOW_SECONDS

    def __post_init__(self) -> None:
        for name in ("tenant_token_budget", "max_tokens_cap"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
        for name in ("tenant_energy_budget", "window_seconds"):
            value = getattr(self, name)
            if value is None and name == "tenant_energy_budget":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}.")

    @property
    def has_budgets(self) -> bool:
        return self.tenant_token_budget is not None or self.tenant_energy_budget is not None


class OverBudgetError(Exception):
    """The tenant has used up a budget; ``reason`` names it, ``retry_after_seconds`` says when to come back."""

    def __init__(self, message: str, reason: str, retry_after_seconds: int):
        super().__init__(message)
        self.reason = reason
        self.retry_after_seconds = retry_after_seconds


@dataclass(frozen=True)
class _Charge:
    time: float
    tokens: int
    joules: float


class _TenantUsage:
    """One tenant's charges inside the window, oldest first, with running sums."""

    def __init__(self) -> None:
        self.charges: deque[_Charge] = deque()
        self.tokens = 0
        self.joules = 0.0

    def add(self, charge: _Charge) -> None:
        self.charges.append(charge)
        self.tokens += charge.tokens
        self.joules += charge.joules

    def expire(self, before: float) -> None:
        """Drop the charges made at or before ``before`` (they have left the window)."""
        while self.charges and self.charges[0].time <= before:
            charge = self.charges.popleft()
            self.tokens -= charge.tokens
            self.joules -= charge.joules
        if not self.charges:  # no float drift left behind
            self.tokens, self.joules = 0, 0.0

    def seconds_until_under(self, amount: Callable[[_Charge], float], used: float, budget: float,
                            window: float, now: float) -> float:
        """How long until enough old charges expire that usage drops below ``budget``."""
        for charge in self.charges:
            used -= amount(charge)
            if used < budget:
                return charge.time + window - now
        return window


class AbuseGuard:
    def __init__(self, config: AbuseGuardConfig | None = None, clock: Callable[[], float] = time.monotonic):
        self.config = config or AbuseGuardConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._usage: dict[str, _TenantUsage] = {}

    @staticmethod
    def tenant_of(user: str | None) -> str:
        """The tenant billed for a request: its ``user``, or the shared anonymous tenant."""
        return user if user else ANONYMOUS_TENANT

    # -- max_tokens -------------------------------------------------------------------------------
    def limit_max_tokens(self, requested: int | None, param: str = "max_tokens", explicit: bool = True) -> int | None:
        """The max_tokens to use: the cap when ``requested`` is None, ``requested`` when within it.

        Above the cap, a value the client sent (``explicit``) is a ValueError naming ``param``; a
        server-side default (completions' 16) is lowered to the cap.
        """
        cap = self.config.max_tokens_cap
        if cap is None or (requested is not None and requested <= cap):
            return requested
        if requested is not None and explicit:
            raise ValueError(f"{param} is {requested}, above this server's cap of {cap} tokens per request.")
        return cap

    # -- budgets ----------------------------------------------------------------------------------
    def check(self, tenant: str) -> None:
        """Raise OverBudgetError if ``tenant`` is at or over a budget in the current window."""
        if not self.config.has_budgets:
            return
        config = self.config
        with self._lock:
            now = self._clock()
            usage = self._current(tenant, now)
            if usage is None:
                return
            over = []
            if config.tenant_token_budget is not None and usage.tokens >= config.tenant_token_budget:
                wait = usage.seconds_until_under(lambda c: c.tokens, usage.tokens, config.tenant_token_budget,
                                                 config.window_seconds, now)
                over.append(("tenant_token_budget", wait,
                             f"{usage.tokens} tokens of its {config.tenant_token_budget}-token budget"))
            if config.tenant_energy_budget is not None and usage.joules >= config.tenant_energy_budget:
                wait = usage.seconds_until_under(lambda c: c.joules, usage.joules, config.tenant_energy_budget,
                                                 config.window_seconds, now)
                over.append(("tenant_energy_budget", wait,
                             f"{usage.joules:.3g} J of its {config.tenant_energy_budget:g} J budget"))
        if not over:
            return
        reason, _, spent = over[0]
        retry_after = max(1, math.ceil(max(wait for _, wait, _ in over)))
        raise OverBudgetError(
            f"tenant {tenant!r} has used {spent} in the last {config.window_seconds:g} s; "
            f"retry after {retry_after} s", reason=reason, retry_after_seconds=retry_after,
        )

    def charge(self, tenant: str, tokens: int, joules: float) -> None:
        """Record what a finished or aborted request really used, at the current time."""
        if not self.config.has_budgets or (tokens <= 0 and joules <= 0):
            return
        with self._lock:
            now = self._clock()
            usage = self._usage.setdefault(tenant, _TenantUsage())
            usage.add(_Charge(now, max(0, tokens), max(0.0, joules)))
            self._forget_idle_tenants(now)

    def usage(self, tenant: str) -> tuple[int, float]:
        """(tokens, joules) charged to ``tenant`` within the current window."""
        with self._lock:
            usage = self._current(tenant, self._clock())
            return (usage.tokens, usage.joules) if usage is not None else (0, 0.0)

    @property
    def num_tracked_tenants(self) -> int:
        """Tenants with charges still held (memory is bounded by the tenants active in one window)."""
        with self._lock:
            return len(self._usage)

    # -- internals (lock held) --------------------------------------------------------------------
    def _current(self, tenant: str, now: float) -> _TenantUsage | None:
        usage = self._usage.get(tenant)
        if usage is None:
            return None
        usage.expire(now - self.config.window_seconds)
        if not usage.charges:
            del self._usage[tenant]
            return None
        return usage

    def _forget_idle_tenants(self, now: float) -> None:
        """Keep memory bounded by the tenants active in the window, not every tenant ever seen."""
        horizon = now - self.config.window_seconds
        for tenant in [name for name, usage in self._usage.items() if usage.charges[-1].time <= horizon]:
            del self._usage[tenant]
