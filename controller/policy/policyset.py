"""A validated, versioned set of policy documents, with the checks that span documents."""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

from controller.model import Address, Scope, SignalKey, model_key
from controller.policy.diagnostics import did_you_mean
from controller.policy.documents import (
    AdaptiveLimit,
    Behavior,
    Document,
    FairShare,
    Limits,
    LimitsSpec,
    Metadata,
    Plan,
    SignalSpec,
    ThrottlePolicy,
)

FAIR_LABEL = "tenant"  # a FairShare's demand is keyed by tenant (its target's $tenant)


@dataclass(frozen=True, slots=True)
class SetProblem:
    """A cross-document problem: which document (by position) and which field path."""

    document: int
    path: tuple[str | int, ...]
    message: str
    # The earlier definition a duplicate clashes with (document, field path): the loader
    # names its file:line, which this module, seeing documents only, cannot.
    first: tuple[int, tuple[str | int, ...]] | None = None


class PolicySetError(ValueError):
    """The documents are each valid but do not fit together."""

    def __init__(self, problems: Sequence[SetProblem]) -> None:
        super().__init__("; ".join(p.message for p in problems))
        self.problems = tuple(problems)


@dataclass(frozen=True, slots=True)
class SignalUse:
    """One named signal of one policy, and the query result it reads."""

    policy: str
    name: str
    spec: SignalSpec
    key: SignalKey
    # Refines a decision the policy takes without it (an AdaptiveLimit's queue inputs: no
    # arrivals is no queue, no latency keeps the wait): its answer, 0 for an absent series
    # included, is no sign that the signals the policy acts on are there.
    advisory: bool = False


@dataclass(frozen=True)
class PolicySet:
    """Everything the engine needs from the policy files, checked as a whole."""

    plans: Mapping[str, Plan]
    limits: Limits
    throttles: tuple[ThrottlePolicy, ...]
    adaptives: tuple[AdaptiveLimit, ...]
    fair_shares: tuple[FairShare, ...] = ()
    version: str = "unversioned"
    documents: tuple[Document, ...] = field(default=(), repr=False)

    @classmethod
    def from_documents(cls, documents: Sequence[Document], version: str) -> PolicySet:
        """Check names, references and targets across documents; raise PolicySetError."""
        problems: list[SetProblem] = []
        seen: dict[tuple[str, str], int] = {}
        for index, doc in enumerate(documents):
            key = (doc.kind, doc.metadata.name)
            if key in seen:
                problems.append(
                    SetProblem(
                        index,
                        ("metadata", "name"),
                        f"{doc.kind} {doc.metadata.name!r} is defined twice "
                        f"(names are unique per kind)",
                        first=(seen[key], ("metadata", "name")),
                    )
                )
            seen.setdefault(key, index)
        plans = {d.metadata.name: d for d in documents if isinstance(d, Plan)}
        limit_docs = [(i, d) for i, d in enumerate(documents) if isinstance(d, Limits)]
        for index, _ in limit_docs[1:]:
            problems.append(
                SetProblem(index, ("kind",), "only one `kind: Limits` document is allowed")
            )
        limits = limit_docs[0][1] if limit_docs else _implicit_limits(plans)
        if limit_docs and plans and limits.spec.default_plan not in plans:
            problems.append(
                SetProblem(
                    limit_docs[0][0],
                    ("spec", "default_plan"),
                    f"default_plan {limits.spec.default_plan!r} is not a Plan "
                    f"(plans: {', '.join(sorted(plans))})"
                    f"{did_you_mean(limits.spec.default_plan, sorted(plans))}",
                )
            )
        problems += _check_plan_targets(documents, plans)
        problems += _check_adaptive_targets(documents)
        if problems:
            raise PolicySetError(problems)
        return cls(
            plans=plans,
            limits=limits,
            throttles=tuple(d for d in documents if isinstance(d, ThrottlePolicy)),
            adaptives=tuple(d for d in documents if isinstance(d, AdaptiveLimit)),
            fair_shares=tuple(d for d in documents if isinstance(d, FairShare)),
            version=version,
            documents=tuple(documents),
        )

    def signal_uses(self) -> Iterator[SignalUse]:
        """Every named signal of every policy with the query result it needs."""
        for policy in self.throttles:
            for name, spec in policy.spec.signals.items():
                yield SignalUse(policy.ref, name, spec, spec.key(policy.spec.per))
        for adaptive in self.adaptives:
            spec = adaptive.spec.signal
            yield SignalUse(adaptive.ref, adaptive.spec.signal_name, spec, spec.key())
            if adaptive.spec.capacity is not None:
                throughput = adaptive.spec.capacity.throughput
                name = throughput.name or "throughput"
                yield SignalUse(adaptive.ref, name, throughput, throughput.key())
                queue = adaptive.spec.capacity.queue
                if queue is not None:
                    arrivals = queue.arrivals
                    named = arrivals.name or "arrivals"
                    yield SignalUse(adaptive.ref, named, arrivals, arrivals.key(), advisory=True)
                if queue is not None and queue.latency is not None:
                    latency = queue.latency.signal
                    named = latency.name or "latency"
                    yield SignalUse(adaptive.ref, named, latency, latency.key(), advisory=True)
        for fair in self.fair_shares:
            demand = fair.spec.demand
            yield SignalUse(fair.ref, "demand", demand, demand.key(FAIR_LABEL))

    def signal_keys(self) -> set[SignalKey]:
        """The distinct query results one tick must fetch (each query runs once)."""
        return {use.key for use in self.signal_uses()}

    def behavior_for(self, policy_ref: str | None) -> Behavior:
        """The behaviour of a policy if it declares one, else the Limits default."""
        declared = self._behaviors.get(policy_ref) if policy_ref else None
        return declared if declared is not None else self.limits.spec.behavior

    @cached_property
    def _behaviors(self) -> dict[str, Behavior]:
        found: dict[str, Behavior] = {}
        for doc in self.throttles:
            if doc.spec.behavior is not None:
                found[doc.ref] = doc.spec.behavior
        for adaptive in self.adaptives:
            if adaptive.spec.behavior is not None:
                found[adaptive.ref] = adaptive.spec.behavior
        for fair in self.fair_shares:
            if fair.spec.behavior is not None:
                found[fair.ref] = fair.spec.behavior
        return found

    @property
    def controllers(self) -> tuple[ThrottlePolicy | AdaptiveLimit | FairShare, ...]:
        """Every document that proposes limits."""
        return (*self.throttles, *self.adaptives, *self.fair_shares)

    def baseline_addresses(self) -> Iterator[tuple[Address, float]]:
        """Addresses whose baseline is stated in the files: global, ip and plan limits."""
        for kind, value in self.limits.spec.global_.items():
            yield Address(Scope.GLOBAL, kind), value
        for kind, value in self.limits.spec.ip.items():
            yield Address(Scope.IP, kind), value
        for name, plan in self.plans.items():
            for kind, value in plan.spec.limits.items():
                yield Address(Scope.PLAN, kind, plan=name), value


def removed_limits(current: PolicySet, new: PolicySet) -> list[Address]:
    """The limits `current` writes from its files (global, ip, plan) that `new` would not."""
    kept = {address for address, _ in new.baseline_addresses()}
    return sorted(
        (address for address, _ in current.baseline_addresses() if address not in kept), key=str
    )


def _implicit_limits(plans: Mapping[str, Plan]) -> Limits:
    """With no Limits document: no global limits, the first plan (by name) as default."""
    default = min(plans) if plans else "default"
    return Limits.model_validate(
        {
            "apiVersion": "governor/v1",
            "kind": "Limits",
            "metadata": Metadata(name="implicit"),
            "spec": LimitsSpec(default_plan=default),
        }
    )


def _check_plan_targets(
    documents: Sequence[Document], plans: Mapping[str, Plan]
) -> Iterator[SetProblem]:
    """Every address a document names (a policy's target, a floor or ceiling) that names a
    plan no Plan defines: it would drive, bound or write a limit no gateway serves."""
    # With no Plan at all, the Limits document's floors are not reported one by one: the set
    # is refused once as incomplete (as default_plan is).
    for index, path, text in _named_addresses(documents, bounds=bool(plans)):
        parts = text.split("/")
        what = path[-1] if path[-1] in ("target", "level") else "address"
        if parts[0] == Scope.PLAN.value and "$" not in parts[1] and parts[1] not in plans:
            yield SetProblem(
                index,
                path,
                f"{what} {text!r} names plan {parts[1]!r}, which no Plan defines "
                f"(plans: {', '.join(sorted(plans)) or 'none'})"
                f"{did_you_mean(parts[1], sorted(plans))}",
            )
            continue
        problem = _model_problem(text, plans)
        if problem is not None:
            yield SetProblem(index, path, f"{what} {text!r}: {problem}")


def _model_problem(text: str, plans: Mapping[str, Plan]) -> str | None:
    """Why an address narrowed to a model (`…@model`) names a model no plan in its scope may
    call (its plan for `plan/<p>/…`, else every plan), or None. Such a limit is met by no
    request: a floor, ceiling or action on it bounds nothing (as `governor override set`
    refuses the same address)."""
    body, at, model = text.partition("@")
    parts = body.split("/")
    if not at or "$" in model or not plans:
        return None
    one = parts[0] == Scope.PLAN.value
    scope = [parts[1]] if one else sorted(plans)
    lists = [plans[name].spec.models for name in scope if name in plans]
    if not lists or not all(lists):
        return None  # a plan that may call any model may call this one
    known = sorted({m for found in lists for m in found})
    if model_key(model) in {model_key(m) for m in known}:
        return None  # limits are met without regard to case (model_key)
    close = difflib.get_close_matches(model, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    who = f"plan {parts[1]!r} may not call" if one else "no plan may call"
    return (
        f"{who} model {model!r}, so no request meets this limit{hint}; "
        f"name one of {', '.join(known)}, or add the model to the plan's `models`"
    )


def _named_addresses(
    documents: Sequence[Document], *, bounds: bool
) -> Iterator[tuple[int, tuple[str | int, ...], str]]:
    """(document index, field path, address text) of every address the documents name (the
    floors and ceilings only with `bounds`)."""
    for index, doc in enumerate(documents):
        if isinstance(doc, ThrottlePolicy):
            for number, action in enumerate(doc.spec.actions):
                yield index, ("spec", "actions", number, "target"), action.target.text
        elif isinstance(doc, AdaptiveLimit):
            yield index, ("spec", "target"), str(doc.spec.target)
        elif isinstance(doc, FairShare):
            yield index, ("spec", "level"), str(doc.spec.level)
        elif bounds and isinstance(doc, Limits):
            for bound in ("floors", "ceilings"):
                for address in getattr(doc.spec, bound):
                    yield index, ("spec", bound, str(address)), str(address)


def _check_adaptive_targets(documents: Sequence[Document]) -> Iterator[SetProblem]:
    owners: dict[Address, str] = {}
    for index, doc in enumerate(documents):
        if not isinstance(doc, AdaptiveLimit):
            continue
        target = doc.spec.target
        if target in owners:
            yield SetProblem(
                index,
                ("spec", "target"),
                f"{target} is already driven by AdaptiveLimit {owners[target]!r}; "
                "two controllers on one limit would fight",
            )
        owners.setdefault(target, doc.metadata.name)
