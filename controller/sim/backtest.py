"""Backtest: replay the policies over a real Prometheus's history, OPEN LOOP.

Every distinct policy query runs once as a range query (on the live signal source's
connection and through its guarded path: its auth, headers, TLS, retry policy, answer size
cap and checks of what came back), with the newest-sample time of each
selector it reads (as the live signal source measures staleness); then the real engine and
resolver step through the history on a virtual clock. What the policies would have written
never feeds back into that history: the history is what happened under whatever limits were
in force then.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from controller.durations import format_duration
from controller.errors import SignalError
from controller.model import Address, Sample, ScalarSample, SignalKey, Snapshot, VectorSample
from controller.policy.baselines import Baselines
from controller.policy.decide import decide
from controller.policy.engine import EngineState
from controller.policy.policyset import PolicySet
from controller.policy.resolver import ResolverState
from controller.signals.decode import ResultShapeError, decode_scalar, decode_vector
from controller.signals.freshness import UNKNOWN_SAMPLE_TIME
from controller.signals.prometheus import PrometheusSource, error_sample
from controller.signals.promql import QuerySyntaxError, freshness_query, selectors

OPEN_LOOP = (
    "OPEN-LOOP backtest: what the policies would have done on this history; the limits "
    "they would have written do not feed back into it"
)


# Prometheus answers no range query of more points per series ("exceeded maximum
# resolution of 11,000 points per timeseries"), and each query is one range query.
MAX_STEPS = 11_000


def window_problem(start: float, end: float, step: float) -> str | None:
    """Why [start, end] every `step` seconds cannot be replayed; None when it can. Past
    MAX_STEPS every query was refused by Prometheus and the engine still stepped through
    each point: minutes and gigabytes for a `--step 1ms`, for nothing."""
    if not end > start or not step > 0:
        return "--to must be after --from, and --step positive"
    steps = math.floor((end - start) / step + 1e-9) + 1
    if steps > MAX_STEPS:
        least = math.ceil((end - start) / (MAX_STEPS - 1))
        return (
            f"{format_duration(end - start)} from --from to --to every {format_duration(step)} "
            f"is {steps:,} evaluations; Prometheus answers at most {MAX_STEPS:,} points per "
            f"query: use --step {format_duration(least)} or more, or a shorter range"
        )
    return None


@dataclass(frozen=True)
class Firing:
    """A policy engaging or releasing (per label value for `per:` policies)."""

    at: float
    policy: str
    key: str
    event: str


@dataclass(frozen=True)
class Write:
    """A limit the policies would have changed."""

    at: float
    address: str
    old: float | None
    new: float | None
    policy: str | None
    reason: str


@dataclass
class BacktestResult:
    start: float
    end: float
    step: float
    times: list[float] = field(default_factory=list)
    firings: list[Firing] = field(default_factory=list)
    writes: list[Write] = field(default_factory=list)
    active: list[dict[str, tuple[str, ...]]] = field(default_factory=list)  # per step
    limits: list[dict[Address, float]] = field(default_factory=list)  # per step, explicit
    signals: dict[str, list[float]] = field(default_factory=dict)  # "policy:name" per step
    errors: list[str] = field(default_factory=list)
    queries: int = 0  # distinct policy queries run
    empty: list[str] = field(default_factory=list)  # queries without one sample in the range
    notes: dict[str, float] = field(default_factory=dict)  # engine note → first time said

    @property
    def all_empty(self) -> bool:
        """No query returned a sample in the whole range: nothing was evaluated."""
        return self.queries > 0 and len(self.empty) == self.queries


Matrix = dict[int, list[tuple[dict[str, str], str]]]  # ms → [(labels, value text)]


def _ms(t: float) -> int:
    return round(t * 1000)


def range_query(
    source: PrometheusSource, query: str, start: float, end: float, step: float
) -> Matrix:
    """One range query; raise SignalError naming the query and the cause."""
    out: Matrix = {}
    for series in source.query_range(query, start, end, step):
        labels = dict(series.get("metric", {}))
        for t, text in series.get("values", []):
            out.setdefault(_ms(float(t)), []).append((labels, text))
    return out


def _instant(matrix: Matrix, t: float) -> list[Any]:
    return [{"metric": labels, "value": [t, text]} for labels, text in matrix.get(_ms(t), [])]


def _sample(key: SignalKey, matrix: Matrix, fresh: float, t: float) -> Sample:
    try:
        result = _instant(matrix, t)
        if key.by is None:
            return decode_scalar(result, fresh)
        return decode_vector(result, key.by, fresh)
    except ResultShapeError as exc:
        return error_sample(key, f"query {key.query!r}: {exc}")


def backtest(
    source: PrometheusSource,
    policies: PolicySet,
    start: float,
    end: float,
    step: float,
    tenants: Mapping[str, str] | None = None,
) -> BacktestResult:
    """Step the engine and resolver through [start, end] every `step` seconds."""
    result = BacktestResult(start, end, step)
    keys = sorted(policies.signal_keys(), key=lambda k: (k.query, k.by or ""))
    history, ages = _histories(source, keys, result)
    baselines = Baselines(policies, tenants or {})
    engine, resolver = EngineState(), ResolverState()
    written: dict[Address, float] = {}
    count = math.floor((end - start) / step + 1e-9) + 1
    for index in range(count):
        t = start + index * step
        snapshot = Snapshot(t, _samples(keys, history, ages, t))
        evaluation, resolution = decide(policies, snapshot, engine, resolver, t, baselines, {})
        engine, resolver = evaluation.state, resolution.state
        result.times.append(t)
        result.active.append(dict(evaluation.active))
        desired = {a: d.value for a, d in resolution.desired.items()}
        result.limits.append(desired)
        for transition in evaluation.transitions:
            result.firings.append(Firing(t, transition.policy, transition.key, transition.event))
        for note in evaluation.notes:  # said every step while it holds: kept once, first time
            result.notes.setdefault(note, t)
        for address in sorted(set(desired) | set(written)):
            old, new = written.get(address), desired.get(address)
            if old != new and index > 0:
                decision = resolution.desired.get(address)
                result.writes.append(
                    Write(
                        t,
                        str(address),
                        old,
                        new,
                        decision.policy if decision else None,
                        decision.reason if decision else "back to inheriting its baseline",
                    )
                )
        written = desired
        _record_signals(result, policies, snapshot, index, count)
    return result


def _histories(
    source: PrometheusSource, keys: Sequence[SignalKey], result: BacktestResult
) -> tuple[dict[str, Matrix | str], dict[str, Matrix | str]]:
    """Each distinct query's history and each selector's newest-sample times over the
    range (a failed query: its error); failures and empty queries noted in `result`."""
    start, end, step = result.start, result.end, result.step
    history: dict[str, Matrix | str] = {}
    ages: dict[str, Matrix | str] = {}
    for query in dict.fromkeys(k.query for k in keys):
        result.queries += 1
        try:
            reads = selectors(query)
        except QuerySyntaxError as exc:  # the age of its data cannot be told: not replayed
            history[query] = error = f"query {query!r} {exc}"
            result.errors.append(error)
            continue
        try:
            history[query] = found = range_query(source, query, start, end, step)
        except SignalError as exc:
            history[query] = str(exc)
            result.errors.append(str(exc))
        else:
            if not found:
                result.empty.append(query)
        for selector in reads:
            if selector not in ages:
                try:
                    ages[selector] = range_query(
                        source, freshness_query(selector), start, end, step
                    )
                except SignalError as exc:
                    ages[selector] = str(exc)
    return history, ages


def _samples(
    keys: Sequence[SignalKey],
    history: Mapping[str, Matrix | str],
    ages: Mapping[str, Matrix | str],
    t: float,
) -> dict[SignalKey, Sample]:
    samples: dict[SignalKey, Sample] = {}
    for key in keys:
        matrix = history[key.query]
        if isinstance(matrix, str):
            samples[key] = error_sample(key, matrix)
            continue
        fresh = t
        for selector in selectors(key.query):
            age = ages.get(selector)
            if isinstance(age, str):
                fresh = UNKNOWN_SAMPLE_TIME
                continue
            found = _instant(age or {}, t)
            newest = float(found[0]["value"][1]) if found else UNKNOWN_SAMPLE_TIME
            fresh = min(fresh, newest)
        samples[key] = _sample(key, matrix, fresh, t)
    return samples


def _record_signals(
    result: BacktestResult, policies: PolicySet, snapshot: Snapshot, index: int, count: int
) -> None:
    for use in policies.signal_uses():
        sample = snapshot.samples.get(use.key)
        name = f"{use.policy.split('/', 1)[1]}:{use.name}"
        if isinstance(sample, ScalarSample):
            values = {name: sample.value}
        elif isinstance(sample, VectorSample):
            pairs = zip(sample.keys, sample.values.tolist(), strict=True)
            values = {f"{name}[{k}]": v for k, v in pairs}
        else:
            values = {}
        for series, value in values.items():
            result.signals.setdefault(series, [math.nan] * count)[index] = value
