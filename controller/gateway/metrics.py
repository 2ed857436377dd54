"""Gateway metrics for Prometheus, the series Governor's own policies read, with capped labels.

Cardinality cap: the first `metrics_max_tenants` tenants and `metrics_max_models` models
seen keep their names; later ones are counted as `_other` (no id's name). Plans come from
the policy files (few). So each series family holds at most tenants × plans × models ×
(outcomes or kinds).
A model the operator named (in the price table or a plan's `models`) always keeps its name
and takes no place under the cap, and a model a plan refused takes none either: a caller
sending made-up model names cannot push the real ones into `_other`, where the policies
reading these series would no longer see them. Models are labelled in lower case, as they
are limited (model.model_key).

Counters whose label sets are closed (the store operations) start at 0, so `increase()` sees
their first event; no counter exports a `_created` series (docs/gateway.md, Metrics).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from controller.model import AddressError, LimitKind, Scope, interned, model_key

# A `_created` series beside every counter child doubles the capped per-tenant series for a
# value nothing reads. prometheus_client's switch is process-wide: set where metrics are made.
disable_created_metrics()  # type: ignore[no-untyped-call]

OTHER = "other"
# The capped labels' values for a name past the cap and for none: no tenant, plan or user id
# can be either (an id starts with a letter or digit and holds no `_`). As `other` and `none`
# they were also a tenant's name: a tenant called `other` was counted with every tenant past
# the cap, and the per-tenant policies reading these series cut it for all of them.
CAPPED = "_other"
ABSENT = "_none"
OUTCOMES = (
    "allow",
    "degraded",
    "rate_limited",
    "budget_exhausted",
    "shed",
    "too_large",
    "unauthenticated",
    "model_not_allowed",
    "bad_request",
    "upstream_error",
    "fail_open",
    "fail_closed",
    "unknown_plan",
    "not_configured",
)
# The limit store calls a gateway makes and may see fail (`gateway_limit_store_errors_total`),
# and those it holds through an outage and may give up (`gateway_store_calls_lost_total`).
# `lookup` and `record`: the tokens of an earlier Responses answer, read and written (and what
# a background answer was charged); `charge`: a background answer settled at its usage;
# `renew`: the lease of a running background answer's slots renewed by a read (never held).
STORE_OPERATIONS = ("authenticate", "admit", "heartbeat", "lookup", "record", "release", "settle",
                    "charge", "renew")  # fmt: skip
HELD_OPERATIONS = ("release", "settle", "charge")
# What a kept Responses answer is recorded under (`gateway_response_records_lost_total`): its
# id, and the conversation it belongs to.
RECORD_KINDS = ("response", "conversation")
# How a lookup that found no record and waited for one ended (`gateway_record_waits_total`).
RECORD_WAIT_OUTCOMES = ("found", "missing", "not_waited")
# Who refused (`gateway_refusals_total`): the level of the limit and its kind, never the tenant
# (that series family stays small; the answer and the log name the tenant's own address).
REFUSING_LEVELS = (*(scope.value for scope in Scope), "credits")
_SHARING_TERMS = (LimitKind.CONCURRENT_HEADROOM, LimitKind.CONCURRENT_WEIGHT)
REFUSING_LIMITS = (*(kind.value for kind in LimitKind if kind not in _SHARING_TERMS), "balance")


def refusing(address: str) -> tuple[str, str]:
    """The (level, limit) of a refusing address: `tenant/acme/requests_per_minute@gpt-4` is
    (tenant, requests_per_minute), `credits/acme` (credits, balance); anything else `other`."""
    if address.startswith("credits/"):
        return "credits", "balance"
    try:
        parsed = interned(address)
    except AddressError:
        return OTHER, OTHER
    limit = parsed.limit.value
    return parsed.scope.value, limit if limit in REFUSING_LIMITS else OTHER


class LabelCap:
    """Keeps the first `limit` distinct values of one label; later values become `_other`.
    `known` values keep their name without taking a place under the cap."""

    def __init__(self, limit: int, known: Callable[[str], bool] | None = None) -> None:
        self.limit = limit
        self.known = known
        self._seen: set[str] = set()
        self._capped = 0  # values in _seen that took a place under the cap
        self._lock = threading.Lock()

    def __call__(self, value: str | None) -> str:
        if value is None or value == "":
            return ABSENT
        if value in self._seen:
            return value
        known = self.known is not None and self.known(value)
        with self._lock:
            if value in self._seen or known:
                self._seen.add(value)
                return value
            if self._capped < self.limit:
                self._capped += 1
                self._seen.add(value)
                return value
        return CAPPED

    def peek(self, value: str | None) -> str:
        """The label `value` has now, without taking a place for it (a value refused before
        it did anything, such as a model its plan does not list)."""
        if value is None or value == "":
            return ABSENT
        if value in self._seen or (self.known is not None and self.known(value)):
            return value
        return CAPPED


class GatewayMetrics:
    """Every series the gateway exports, on its own registry (served at /metrics)."""

    def __init__(
        self, max_tenants: int, max_models: int, known_model: Callable[[str], bool] | None = None
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.tenant = LabelCap(max_tenants)
        self._model = LabelCap(max_models, known_model)
        self.plan = LabelCap(max_models)  # plans are few; the cap only guards forged claims
        labels = ("tenant", "plan", "model")
        self.requests = Counter(
            "gateway_requests",
            "Requests by tenant, plan, model and outcome",
            (*labels, "outcome"),
            registry=self.registry,
        )
        self.refusals = Counter(
            "gateway_refusals",
            "Requests a limit refused (429, 402, 400 too large), by the limit's level and "
            "kind: which level binds (global, plan, tenant, ...), without a series per tenant",
            ("level", "limit"),
            registry=self.registry,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens used (settled), by kind: prompt or completion",
            (*labels, "kind"),
            registry=self.registry,
        )
        # Requests admitted and still holding their concurrency slots: a tenant held to a
        # concurrency limit shows its cap here, so its demand is this × offered ÷ admitted
        # (Little's law). A background response counts until its slots are given back.
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Requests admitted and still holding their slots (a background response: until "
            "read finished or its lease ends), by tenant, plan and model",
            labels,
            registry=self.registry,
        )
        # Background responses answered while their slots stay held, by (tenant, response
        # id): their labels and when their lease ends (a `clock` time).
        self._held: dict[tuple[str, str], tuple[tuple[str, str, str], float]] = {}
        self._held_lock = threading.Lock()
        self.clock = time.monotonic
        self.cost = Counter(
            "gateway_cost_usd", "Cost of the tokens used, in USD", labels, registry=self.registry
        )
        self.estimated = Counter(
            "gateway_usage_estimated",
            "Responses settled from an estimate because the upstream sent no usage",
            ("plan",),
            registry=self.registry,
        )
        self.store_errors = Counter(
            "gateway_limit_store_errors",
            "Calls to the limit store (Redis) that failed, by operation",
            ("operation",),
            registry=self.registry,
        )
        self.held_store_calls = Gauge(
            "gateway_held_store_calls",
            "Settles and releases that met a Redis outage, held until it answers",
            registry=self.registry,
        )
        self.store_calls_lost = Counter(
            "gateway_store_calls_lost",
            "Held settles and releases given up (past their settle record, or the queue full)",
            ("operation",),
            registry=self.registry,
        )
        self.record_waits = Counter(
            "gateway_record_waits",
            "Lookups of an earlier response or conversation (previous_response_scope tenant) "
            "that found no record and waited for one, by outcome: found (a settle still "
            "writing it), missing (refused 404 after the wait), not_waited (refused at once: "
            "as many lookups wait already as PREVIOUS_RESPONSE_WAITERS lets)",
            ("outcome",),
            registry=self.registry,
        )
        self.records_lost = Counter(
            "gateway_response_records_lost",
            "Records of a kept Responses answer's tokens that Redis failed every try to write, "
            "by kind (response, conversation): a request continuing it is refused 404 "
            "(previous_response_scope tenant) or reserves the default (shared)",
            ("kind",),
            registry=self.registry,
        )
        self.live_gateways = Gauge(
            "gateway_live_gateways",
            "Gateways alive at the last heartbeat (the fail-open divisor)",
            registry=self.registry,
        )
        self.budget_remaining = Gauge(
            "gateway_budget_remaining_ratio",
            "Share of a tenant's tightest token budget still available at its last request "
            "(remaining / limit; credits have no limit and are not shown here)",
            ("tenant", "budget"),
            registry=self.registry,
        )
        self.admission_seconds = Histogram(
            "gateway_admission_seconds",
            "Time to authenticate and admit a request (Redis round trips included)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=self.registry,
        )
        # Closed label sets exported at 0 from the start: a counter child born at its first
        # event has no earlier sample, so `increase()` would miss that event.
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
        for operation in HELD_OPERATIONS:
            self.store_calls_lost.labels(operation)
        for kind in RECORD_KINDS:
            self.records_lost.labels(kind)
        for outcome in RECORD_WAIT_OUTCOMES:
            self.record_waits.labels(outcome)
        for level in REFUSING_LEVELS:
            for limit in REFUSING_LIMITS:
                if (level == "credits") == (limit == "balance"):
                    self.refusals.labels(level, limit)

    def refused_by(self, address: str) -> None:
        """A request a limit refused (429, 402, or too large for it): counted by that
        limit's level and kind."""
        self.refusals.labels(*refusing(address)).inc()

    def model(self, model: str | None) -> str:
        """A model's label: lower case, capped (known models always named)."""
        return self._model(model_key(model) if model else model)

    def request(
        self, tenant: str | None, plan: str | None, model: str | None, outcome: str
    ) -> None:
        # A model its plan refused did nothing: it is named only if it already is.
        key = model_key(model) if model else model
        name = self._model.peek(key) if outcome == "model_not_allowed" else self._model(key)
        self.requests.labels(self.tenant(tenant), self.plan(plan), name, outcome).inc()

    def started(self, tenant: str, plan: str, model: str) -> None:
        """An admitted request begins (its `finished` must follow, once)."""
        self.in_flight.labels(self.tenant(tenant), self.plan(plan), self.model(model)).inc()

    def finished(self, tenant: str, plan: str, model: str) -> None:
        """An admitted request settled or released."""
        self.in_flight.labels(self.tenant(tenant), self.plan(plan), self.model(model)).dec()

    def held(self, tenant: str, plan: str, model: str, response_id: str, until: float) -> None:
        """An admitted request whose answer ended while its slots stay held (a background
        response still generating), in place of `finished`: in flight until `given_back`
        or `until` (a `clock` time: its admission's lease ends, and Redis frees its slots
        then). The lease is this process's to see, the Redis sweep is not: kept here."""
        names = (self.tenant(tenant), self.plan(plan), self.model(model))
        with self._held_lock:
            before = self._held.pop((tenant, response_id), None)
            self._held[tenant, response_id] = (names, until)
        if before is not None:  # the same id answered twice: one of them is over
            self.in_flight.labels(*before[0]).dec()
        self.expire()

    def given_back(self, tenant: str, response_id: str) -> None:
        """A background response's slots were given back (read finished, or cancelled):
        out of the gauge, once. Nothing for one this process does not hold (admitted by
        another gateway, given back already, or its lease ended)."""
        with self._held_lock:
            gone = self._held.pop((tenant, response_id), None)
        if gone is not None:
            self.in_flight.labels(*gone[0]).dec()

    def renewed(self, tenant: str, response_id: str, seconds: float) -> None:
        """A read found a held background response still running and renewed its slots'
        lease: it stays in flight `seconds` more (nothing for one this process does not hold)."""
        with self._held_lock:
            held = self._held.get((tenant, response_id))
            if held is not None:
                self._held[tenant, response_id] = (held[0], self.clock() + seconds)

    def expire(self) -> None:
        """Background responses whose lease has ended leave the gauge (their slots are
        freed by then: the next admission's sweep gives them back). Run at every scrape."""
        now = self.clock()
        with self._held_lock:
            ended = [key for key, (_names, until) in self._held.items() if until <= now]
            gone = [self._held.pop(key)[0] for key in ended]
        for names in gone:
            self.in_flight.labels(*names).dec()

    def usage(
        self,
        tenant: str,
        plan: str,
        model: str,
        prompt_tokens: int,
        completion_tokens: int,
        cost_usd: float,
    ) -> None:
        names = (self.tenant(tenant), self.plan(plan), self.model(model))
        self.tokens.labels(*names, "prompt").inc(prompt_tokens)
        self.tokens.labels(*names, "completion").inc(completion_tokens)
        if cost_usd > 0:
            self.cost.labels(*names).inc(cost_usd)

    def budget(self, tenant: str, address: str, limit: float | None, remaining: float) -> None:
        """Record a tenant's budget after an admission decision (token budgets only)."""
        if limit:
            share = max(0.0, min(1.0, remaining / limit))
            self.budget_remaining.labels(self.tenant(tenant), "tokens").set(share)
