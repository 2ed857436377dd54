"""Policy unit tests (`*_test.yaml`), in the manner of `promtool test rules`.

Signal values per evaluation interval are written in expanding notation (`'0.5x4 0.95x10'`,
`'1+1x3'`, `_` for a missing sample); the real engine and resolver run over them on a virtual
clock, and the limits in force are compared with the expectations.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
)

from controller.durations import format_duration
from controller.errors import PolicyError
from controller.model import (
    Address,
    Override,
    Sample,
    ScalarSample,
    SignalKey,
    Snapshot,
    Validity,
    VectorSample,
)
from controller.policy.baselines import Baselines
from controller.policy.decide import decide
from controller.policy.diagnostics import format_path
from controller.policy.documents import AddressField, Duration, distinct_addresses
from controller.policy.engine import EngineState
from controller.policy.loader import (
    TEST_SUFFIXES,
    LocatedError,
    name_case_problem,
    not_utf8,
    policy_files,
    read_file,
)
from controller.policy.policyset import PolicySet
from controller.policy.resolver import ResolverState
from controller.policy.sourcemap import SourceDocument, parse_yaml
from controller.policy.text import fmt_number

_TERM = re.compile(
    r"^(?P<start>_|[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)"
    r"(?:(?P<sign>[-+])(?P<step>(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?))?"
    r"(?:x(?P<count>\d+))?$"
)


# Evaluations one test case may run, and samples one series may hold: a test a few days
# long at 1s is far within it (the shipped ones run at most 50), while a typo (`0.5x999999999`,
# `interval: 1ms` beside `at: 30d`) would hold `governor policy test`, and the CI job running
# it, for hours or exhaust its memory (~0.3 ms an evaluation, ~32 bytes a sample).
MAX_STEPS = 100_000
SCALAR, VECTOR = "one series", "a series per label value"  # tags of a signal's two shapes


def expand_series(text: object) -> list[float | None]:
    """`'0.5x2 1+1x2 _'` → [0.5, 0.5, 0.5, 1, 2, 3, None]. Raise ValueError naming the term."""
    if isinstance(text, list | dict):
        raise ValueError(
            f"{text!r} is not expanding notation: write a series as one string, e.g. "
            "'0.5x4 0.95x10', and a series per label value as a mapping of such strings"
        )
    values: list[float | None] = []
    for term in str(text).split():
        match = _TERM.match(term)
        if match is None:
            raise ValueError(
                f"{term!r} is not expanding notation: use `a`, `axN` (a, N more times), "
                "`a+bxN` / `a-bxN` (a then N steps of b), or `_` / `_xN` for missing samples"
            )
        count = int(match.group("count") or 0)
        if len(values) + count + 1 > MAX_STEPS:
            raise ValueError(
                f"{term!r} makes the series longer than {MAX_STEPS:,} samples, the most a "
                "test evaluates: samples past the last expectation are never read"
            )
        if match.group("start") == "_":
            if match.group("step"):
                raise ValueError(f"{term!r}: a missing sample `_` cannot have a step")
            values.extend([None] * max(count, 1))
            continue
        start = float(match.group("start"))
        step = float(match.group("step") or 0.0) * (-1 if match.group("sign") == "-" else 1)
        values.extend(start + step * i for i in range(count + 1))
    return values


Series = Annotated[list[float | None], BeforeValidator(expand_series)]
# One series, or one per label value: the shape written picks the branch, so a bad series is
# one error, not one per shape it could have had ("Input should be a valid dictionary").
SignalSeries = Annotated[
    Annotated[Series, Tag(SCALAR)] | Annotated[dict[str, Series], Tag(VECTOR)],
    Discriminator(lambda value: VECTOR if isinstance(value, Mapping) else SCALAR),
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class TestOverride(_Strict):
    """A person's pin during the test, from `at` for `ttl`."""

    address: AddressField
    value: float = Field(ge=0, allow_inf_nan=False)
    at: Duration = 0.0
    ttl: Duration = Field(3600.0, gt=0)
    reason: str = "policy test"


class Expectation(_Strict):
    at: Duration
    limits: Annotated[dict[AddressField, float | None], BeforeValidator(distinct_addresses)] = (
        Field(default_factory=dict, description="limits in force; null = no limit")
    )
    active: list[str] | None = Field(
        None, description="names of the policies active at that time (`name` or `name/key`)"
    )


_EARLIEST_START = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_LATEST_START = dt.datetime(9000, 1, 1, tzinfo=dt.UTC)


class PolicyTestCase(_Strict):
    __test__ = False  # not a pytest class

    name: str
    start: dt.datetime | None = None
    tenants: dict[str, str] = Field(default_factory=dict)
    signals: dict[str, SignalSeries] = Field(default_factory=dict)
    overrides: list[TestOverride] = Field(default_factory=list)
    expect: list[Expectation] = Field(min_length=1)

    @field_validator("start")
    @classmethod
    def _aware(cls, value: dt.datetime | None) -> dt.datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("start needs a time zone, e.g. 2026-03-02T09:00:00Z")
        # A schedule reads the test's clock as a local date, which Python cannot make before
        # year 1 or after 9999: such a start (and up to 366d after it) ended in a traceback.
        if value is not None and not _EARLIEST_START <= value <= _LATEST_START:
            raise ValueError(
                f"start {value.isoformat()} is outside the years 1970 to 9000 a test may start "
                "in, e.g. 2026-03-02T09:00:00Z"
            )
        return value


class PolicyTestFile(_Strict):
    __test__ = False

    policy_files: list[str] = Field(min_length=1)
    interval: Duration = Field(30.0, gt=0)
    tests: list[PolicyTestCase] = Field(min_length=1)


@dataclass
class CaseResult:
    """The outcome of one test case: failures are human-readable lines."""

    name: str
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures


LoadPolicies = Callable[[Sequence[Path]], PolicySet]


def find_test_files(directory: Path) -> list[Path]:
    """The policy test files of `directory`, sorted: by the name in any case, as the loader
    leaves them out (`x_TEST.YAML` found is refused with the rename; skipped, its tests
    never ran and the run said nothing)."""
    found = (p for p in directory.iterdir() if p.name.lower().endswith(TEST_SUFFIXES))
    return sorted(p for p in found if p.is_file())


def read_test_file(path: Path) -> tuple[PolicyTestFile | None, list[LocatedError]]:
    """Parse one test file; every error is located at file:line:column."""
    if (problem := name_case_problem(path.name)) is not None:
        return None, [LocatedError(str(path), 1, 1, "", problem)]
    try:
        data = read_file(path, path.parent)
    except PolicyError as exc:  # too large, a FIFO, a link out of the directory
        return None, [LocatedError(str(path), 1, 1, "", str(exc))]
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:  # where, and the conversion that fixes it
        return None, [not_utf8(str(path), data, exc)]
    source = parse_yaml(text)
    errors = [
        LocatedError(str(path), p.position.line, p.position.column, format_path(p.path), p.message)
        for p in (*source.problems, *(q for d in source.documents for q in d.problems))
    ]
    if errors:
        return None, errors
    if len(source.documents) != 1:
        message = "a policy test file holds exactly one YAML document"
        return None, [LocatedError(str(path), 1, 1, "", message)]
    document = source.documents[0]
    try:
        spec = PolicyTestFile.model_validate(document.value)
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(
                part
                for part in error["loc"]
                if not str(part).startswith("function-") and part not in (SCALAR, VECTOR)
            )
            _, spot = document.spot(loc)
            where = format_path(loc)
            errors.append(
                LocatedError(
                    str(path), spot.value.line, spot.value.column, where, f"{where}: {error['msg']}"
                )
            )
        return None, errors
    errors = _unread_policy_files(path, document, spec.policy_files)
    return (None, errors) if errors else (spec, [])


def _unread_policy_files(
    path: Path, document: SourceDocument, names: Sequence[str]
) -> list[LocatedError]:
    """The names that are not policy files of the test's directory as the controller reads
    it: a test of `../plans.yaml`, `sub/x.yaml` or `x.yaml.bak` passed on a set never run."""
    try:
        known = {file.name for file in policy_files(path.parent)}
    except PolicyError as exc:
        return [LocatedError(str(path), 1, 1, "policy_files", str(exc))]
    errors = []
    for number, name in enumerate(names):
        if name not in known:
            _, spot = document.spot(("policy_files", number))
            message = (
                f"policy_files[{number}]: {name!r} is not a policy file beside this test: "
                f"name files of this directory as the controller reads them "
                f"({', '.join(sorted(known)) or 'none'})"
            )
            errors.append(
                LocatedError(str(path), spot.value.line, spot.value.column, "policy_files", message)
            )
    return errors


def run_file(path: Path, spec: PolicyTestFile, load: LoadPolicies) -> list[CaseResult]:
    """Run every case of one test file; policies are loaded relative to the file."""
    policies = load([path.parent / name for name in spec.policy_files])
    return [run_case(policies, case, spec.interval) for case in spec.tests]


def run_case(policies: PolicySet, case: PolicyTestCase, interval: float) -> CaseResult:
    """Drive the engine and resolver tick by tick and check each expectation."""
    result = CaseResult(case.name)
    keys = _signal_keys(policies, case, result)
    if result.failures:
        return result
    start = case.start.timestamp() if case.start else 0.0
    due: dict[int, list[Expectation]] = {}
    for expectation in case.expect:
        tick = expectation.at / interval
        problem = _step_problem(tick, interval)
        if problem is not None:
            result.failures.append(f"expect at {format_duration(expectation.at)}: {problem}")
            continue
        due.setdefault(round(tick), []).append(expectation)
    baselines = Baselines(policies, case.tenants)
    engine, resolver = EngineState(), ResolverState()
    for tick in range(max(due, default=-1) + 1):
        now = start + tick * interval
        snapshot = Snapshot(now, _samples(case, keys, tick, now))
        overrides = _overrides(case, tick * interval, start)
        evaluation, resolution = decide(
            policies, snapshot, engine, resolver, now, baselines, overrides
        )
        engine, resolver = evaluation.state, resolution.state
        for expectation in due.get(tick, []):
            when = format_duration(expectation.at)
            for address, expected in expectation.limits.items():
                decision = resolution.desired.get(address)
                actual = decision.value if decision else baselines.value(address)
                if not _same(actual, expected):
                    why = decision.reason if decision else "not written: inherits its baseline"
                    result.failures.append(
                        f"at {when}: {address}: expected {_show(expected)}, got {_show(actual)} "
                        f"({why})"
                    )
            if expectation.active is not None:
                active = sorted(
                    f"{ref.split('/', 1)[1]}/{key}" if key else ref.split("/", 1)[1]
                    for ref, active_keys in evaluation.active.items()
                    for key in active_keys
                )
                if sorted(expectation.active) != active:
                    result.failures.append(
                        f"at {when}: active policies: expected {sorted(expectation.active)}, "
                        f"got {active}"
                    )
    return result


def _step_problem(tick: float, interval: float) -> str | None:
    """Why an expectation `tick` intervals after the start cannot be checked, else None."""
    if not math.isclose(tick, round(tick)):
        return f"not a multiple of the interval {format_duration(interval)}"
    if tick > MAX_STEPS:
        return (
            f"{round(tick):,} evaluations at the interval {format_duration(interval)}, over the "
            f"{MAX_STEPS:,} a test may run: lengthen the interval or expect sooner"
        )
    return None


def _same(actual: float | None, expected: float | None) -> bool:
    """Equal up to a relative 1e-6: expectations are written in decimal, values are floats."""
    if actual is None or expected is None:
        return actual is expected
    return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9)


def _show(value: float | None) -> str:
    return "no limit" if value is None else fmt_number(value)


def _signal_keys(
    policies: PolicySet, case: PolicyTestCase, result: CaseResult
) -> dict[str, list[SignalKey]]:
    keys: dict[str, list[SignalKey]] = {}
    for use in policies.signal_uses():
        keys.setdefault(use.name, []).append(use.key)
    for name in case.signals:
        if name not in keys:
            result.failures.append(
                f"signal {name!r} is not used by any policy in policy_files "
                f"(signals: {', '.join(sorted(keys)) or 'none'})"
            )
    return keys


def _samples(
    case: PolicyTestCase, keys: Mapping[str, list[SignalKey]], tick: int, now: float
) -> dict[SignalKey, Sample]:
    samples: dict[SignalKey, Sample] = {}
    for name, series in case.signals.items():
        for key in keys.get(name, []):
            if isinstance(series, dict):
                samples[key] = _vector(key.by or "label", series, tick, now)
            else:
                samples[key] = _scalar(series, tick, now)
    return samples


def _at(series: list[float | None], tick: int) -> float | None:
    return series[tick] if tick < len(series) else None


def _scalar(series: list[float | None], tick: int, now: float) -> ScalarSample:
    value = _at(series, tick)
    if value is None:
        return ScalarSample(math.nan, now, Validity.EMPTY, "no sample in the test series")
    return ScalarSample(value, now)


def _vector(label: str, series: Mapping[str, list[float | None]], tick: int, now: float) -> Sample:
    present = [(k, v) for k, s in series.items() if (v := _at(s, tick)) is not None]
    if not present:
        return VectorSample(label, (), np.empty(0), np.empty(0), Validity.EMPTY)
    return VectorSample(
        label,
        tuple(k for k, _ in present),
        np.array([v for _, v in present], dtype=np.float64),
        np.full(len(present), now),
    )


def _overrides(case: PolicyTestCase, elapsed: float, start: float) -> dict[Address, Override]:
    return {
        o.address: Override(o.address, o.value, start + o.at + o.ttl, "policy-test", o.reason)
        for o in case.overrides
        if o.at <= elapsed
    }
