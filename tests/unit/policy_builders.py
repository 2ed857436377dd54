"""Small builders for policy documents, snapshots and a virtual-clock engine driver (tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import numpy as np

from controller.model import (
    Address,
    Override,
    Proposal,
    Sample,
    ScalarSample,
    SignalKey,
    Snapshot,
    Validity,
    VectorSample,
)
from controller.policy.baselines import Baselines
from controller.policy.decide import decide
from controller.policy.documents import (
    AdaptiveLimit,
    Document,
    DocumentFile,
    FairShare,
    Limits,
    Plan,
    ThrottlePolicy,
)
from controller.policy.engine import EngineState, Evaluation, evaluate
from controller.policy.policyset import PolicySet
from controller.policy.resolver import Resolution, ResolverState, resolve

GPU_QUERY = "avg(DCGM_FI_DEV_GPU_UTIL) / 100"
SPEND_QUERY = "sum by (tenant) (rate(gateway_cost_usd_total[5m]))"
USUAL_QUERY = "sum by (tenant) (rate(gateway_cost_usd_total[1h] offset 1d))"
GPU_SIGNAL = {"gpu_util": {"query": GPU_QUERY, "stale_after": "60s"}}
COST_SIGNALS = {"spend": {"query": SPEND_QUERY}, "usual": {"query": USUAL_QUERY}}


def document(kind: str, name: str, spec: Mapping[str, Any]) -> Document:
    """Any governor/v1 document, validated exactly as the loader validates it."""
    raw = {"apiVersion": "governor/v1", "kind": kind, "metadata": {"name": name}, "spec": spec}
    return DocumentFile.model_validate({"document": raw}).document


def plan(name: str, models: Sequence[str] = (), **limits: float) -> Plan:
    """A Plan; without `models` it may call any model (the field left out, as `[]` is refused)."""
    spec: dict[str, Any] = {"limits": limits}
    if models:
        spec["models"] = list(models)
    doc = document("Plan", name, spec)
    assert isinstance(doc, Plan)
    return doc


def limits(
    *,
    default_plan: str = "free",
    global_: Mapping[str, float] | None = None,
    ip: Mapping[str, float] | None = None,
    floors: Mapping[str, float] | None = None,
    ceilings: Mapping[str, float] | None = None,
    behavior: Mapping[str, Any] | None = None,
) -> Limits:
    spec: dict[str, Any] = {
        "default_plan": default_plan,
        "global": dict(global_ or {}),
        "ip": dict(ip or {}),
        "floors": dict(floors or {}),
        "ceilings": dict(ceilings or {}),
    }
    if behavior is not None:
        spec["behavior"] = behavior
    doc = document("Limits", "global", spec)
    assert isinstance(doc, Limits)
    return doc


def throttle(name: str, actions: Sequence[Mapping[str, Any]], **spec: Any) -> ThrottlePolicy:
    """A ThrottlePolicy; `for_` stands for `for`. Signals default to the GPU signal."""
    body: dict[str, Any] = {"signals": GPU_SIGNAL, **spec, "actions": list(actions)}
    if "for_" in body:
        body["for"] = body.pop("for_")
    doc = document("ThrottlePolicy", name, body)
    assert isinstance(doc, ThrottlePolicy)
    return doc


def cost_policy(name: str = "tenant-cost-anomaly", **spec: Any) -> ThrottlePolicy:
    """The per-tenant cost-anomaly policy of POLICY_FORMAT.md; keyword arguments override."""
    body: dict[str, Any] = {
        "per": "tenant",
        "signals": COST_SIGNALS,
        "when": "spend > 3.0 * usual && spend > 0.01",
        "for_": "5m",
        **spec,
    }
    action = {"target": "tenant/$tenant/tokens_per_minute", "scale": 0.25, "min": 1000}
    return throttle(name, body.pop("actions", [action]), **body)


def adaptive(name: str = "rps-by-gpu", **spec: Any) -> AdaptiveLimit:
    """An AIMD AdaptiveLimit on global/requests_per_second; keyword arguments override."""
    body: dict[str, Any] = {
        "target": "global/requests_per_second",
        "signal": {"query": GPU_QUERY, "stale_after": "60s", "name": "gpu_util"},
        "setpoint": 0.8,
        "algorithm": "aimd",
        "aimd": {"increase": 50, "decrease_factor": 0.8, "tolerance": 0.05},
        "bounds": {"min": 200, "max": 5000},
        **spec,
    }
    doc = document("AdaptiveLimit", name, body)
    assert isinstance(doc, AdaptiveLimit)
    return doc


DEMAND_QUERY = "sum by (tenant) (gateway_requests_in_flight)"


def fair_share(name: str = "fair", **spec: Any) -> FairShare:
    """A FairShare of global/concurrent_requests by plan weight; keyword arguments override."""
    body: dict[str, Any] = {
        "level": "global/concurrent_requests",
        "target": "tenant/$tenant/concurrent_requests",
        "demand": {"query": DEMAND_QUERY, "stale_after": "60s"},
        "weights": {"paid": 2, "free": 1},
        "reserve": 0,  # shares by plain water-filling (the reserve has tests of its own)
        **spec,
    }
    doc = document("FairShare", name, body)
    assert isinstance(doc, FairShare)
    return doc


def standard_documents(**limit_options: Any) -> list[Document]:
    """The plans and limits of POLICY_FORMAT.md (free, paid, a tiny plan) plus a Limits doc."""
    options: dict[str, Any] = {
        "global_": {"requests_per_second": 2000, "tokens_per_minute": 5_000_000},
        "ip": {"requests_per_minute": 1000},
        **limit_options,
    }
    return [
        plan("free", ["gpt-3.5-turbo"], requests_per_minute=10, tokens_per_day=1000),
        plan(
            "paid",
            ["gpt-3.5-turbo", "gpt-4"],
            requests_per_minute=600,
            tokens_per_minute=20000,
            tokens_per_day=100000,
        ),
        plan("tiny", tokens_per_minute=2000),
        limits(**options),
    ]


def policy_set(*policies: Document, **limit_options: Any) -> PolicySet:
    """The standard plans and limits plus the given policies, as one PolicySet."""
    return PolicySet.from_documents([*standard_documents(**limit_options), *policies], "v1")


def berlin(text: str) -> float:
    """Unix seconds of a wall-clock time in Europe/Berlin, e.g. `2026-03-02 08:30`."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("Europe/Berlin")).timestamp()


def vector(
    label: str,
    values: Mapping[str, float],
    timestamp: float,
    validity: Validity = Validity.OK,
) -> VectorSample:
    return VectorSample(
        label,
        tuple(values),
        np.array(list(values.values()), dtype=np.float64),
        np.full(len(values), timestamp),
        validity,
    )


Reading = float | Sample


@dataclass
class Driver:
    """Runs the engine (and resolver) tick by tick on a virtual clock, carrying their state.

    A scalar reading is a float (a fresh sample taken at `now`) or a ready-made sample; a
    tenant vector is a mapping tenant → value, sampled at `now`.
    """

    policies: PolicySet
    registry: Mapping[str, str] = field(default_factory=dict)
    engine: EngineState = field(default_factory=EngineState)
    resolver: ResolverState = field(default_factory=ResolverState)

    @property
    def baselines(self) -> Baselines:
        return Baselines(self.policies, self.registry)

    def snapshot(
        self,
        now: float,
        scalars: Mapping[str, Reading],
        tenants: Mapping[str, Mapping[str, float] | Sample],
    ) -> Snapshot:
        samples: dict[SignalKey, Sample] = {}
        for query, reading in scalars.items():
            sample = reading if not isinstance(reading, float | int) else ScalarSample(reading, now)
            samples[SignalKey(query)] = sample
        for query, values in tenants.items():
            sample = values if isinstance(values, Sample) else vector("tenant", values, now)
            samples[SignalKey(query, "tenant")] = sample
        return Snapshot(now, samples)

    def tick(
        self,
        now: float,
        scalars: Mapping[str, Reading] | None = None,
        tenants: Mapping[str, Mapping[str, float] | Sample] | None = None,
        current: Mapping[Address, float] | None = None,
    ) -> Evaluation:
        """One engine evaluation at `now`; the new engine state is kept for the next tick."""
        snapshot = self.snapshot(now, scalars or {}, tenants or {})
        result = evaluate(self.policies, snapshot, self.engine, now, self.baselines, current)
        self.engine = result.state
        return result

    def decide(
        self,
        now: float,
        scalars: Mapping[str, Reading] | None = None,
        tenants: Mapping[str, Mapping[str, float] | Sample] | None = None,
        overrides: Mapping[Address, Override] | None = None,
    ) -> tuple[Evaluation, Resolution]:
        """One whole decision at `now` (engine, fair shares, resolver), as a tick makes it."""
        snapshot = self.snapshot(now, scalars or {}, tenants or {})
        evaluation, resolution = decide(
            self.policies,
            snapshot,
            self.engine,
            self.resolver,
            now,
            self.baselines,
            overrides or {},
        )
        self.engine, self.resolver = evaluation.state, resolution.state
        return evaluation, resolution

    def gpu(self, now: float, value: Reading) -> Evaluation:
        return self.tick(now, {GPU_QUERY: value})

    def cost(
        self, now: float, spend: Mapping[str, float] | Sample, usual: Mapping[str, float] | Sample
    ) -> Evaluation:
        return self.tick(now, tenants={SPEND_QUERY: spend, USUAL_QUERY: usual})

    def resolve(
        self,
        now: float,
        proposals: Sequence[Proposal] = (),
        overrides: Mapping[Address, Override] | None = None,
        frozen: bool = False,
    ) -> Resolution:
        """One resolver pass at `now`; the new resolver state is kept for the next tick."""
        result = resolve(
            self.policies, self.baselines, proposals, overrides or {}, self.resolver, now, frozen
        )
        self.resolver = result.state
        return result


def values_of(evaluation: Evaluation) -> dict[str, float]:
    """Proposal address text → value (one proposal per address in these tests)."""
    return {str(p.address): p.value for p in evaluation.proposals}


def events_of(evaluation: Evaluation) -> list[tuple[str, str, str]]:
    """(policy, key, event) of every transition."""
    return [(t.policy, t.key, t.event) for t in evaluation.transitions]


def addr(text: str) -> Address:
    return Address.parse(text)


def proposal(address: str, value: float, policy: str = "ThrottlePolicy/test") -> Proposal:
    return Proposal(addr(address), value, policy, f"{policy} wants {value}")


def override(address: str, value: float, expires_at: float) -> tuple[Address, Override]:
    target = addr(address)
    return target, Override(target, value, expires_at, "alice", "incident 42")
