"""The policy file format (governor/v1): strict pydantic models for Plan, Limits, ThrottlePolicy,
AdaptiveLimit and FairShare documents. Pure: parsing and validation only."""

from __future__ import annotations

import sys
from functools import cache
from typing import Annotated, Any, Literal
from zoneinfo import available_timezones

import numpy as np
import numpy.typing as npt
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PrivateAttr,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from controller.contract.catalog import (
    NonNegativeNumber,
    NotBoolean,
    PlanTerms,
    PositiveNumber,
    Strict,
)
from controller.durations import (
    DURATION_PATTERN,
    MAX_DURATION_SECONDS,
    format_duration,
    parse_duration,
)
from controller.model import (
    Address,
    AddressError,
    AddressTemplate,
    LimitKind,
    Scope,
    SignalKey,
    placement_problem,
    value_problem,
)
from controller.policy.expressions import Expression, ExpressionError, compile_expression
from controller.policy.schedule import Window, parse_window
from controller.promql_grammar import parse

API_VERSION = "governor/v1"

# PromQL is sent to Prometheus on every tick in a URL; real queries are a few hundred bytes.
MAX_QUERY_CHARS = 8192


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "pattern": DURATION_PATTERN},
                {"type": "number", "minimum": 0, "maximum": MAX_DURATION_SECONDS},
            ]
        }
    ),
]


def _parse_address(value: object) -> Address:
    if isinstance(value, Address):
        return value
    if not isinstance(value, str):
        raise ValueError("an address is text like tenant/acme/tokens_per_minute")
    try:
        return Address.parse(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def _parse_template(value: object) -> AddressTemplate:
    if isinstance(value, AddressTemplate):
        return value
    if not isinstance(value, str):
        raise ValueError("a target is text like tenant/$tenant/tokens_per_minute")
    try:
        return AddressTemplate.parse(value)
    except AddressError as exc:
        raise ValueError(str(exc)) from None


def distinct_addresses(value: object) -> object:
    """A mapping keyed by address text whose keys are distinct addresses: two keys that differ
    only in the model's case (`…@GPT-4`, `…@gpt-4`) are one address (model_key), and which
    value won would be an accident of their order. ValueError naming both."""
    if not isinstance(value, dict):
        return value
    seen: dict[Address, str] = {}
    for key in value:
        try:
            address = _parse_address(key)
        except ValueError:
            continue  # the field's own validation names it
        other = seen.setdefault(address, str(key))
        if other != str(key):
            raise ValueError(
                f"{other!r} and {key!r} are one address ({address}: a model is met without "
                "regard to case); keep one of them"
            )
    return value


_ADDRESS_SCHEMA = {
    "type": "string",
    "pattern": r"^(global|ip|plan/[^/@]+|tenant/[^/@]+|user/[^/@]+/[^/@]+)/[a-z_]+(@[^@]+)?$",
}
AddressField = Annotated[
    Address,
    BeforeValidator(_parse_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(_ADDRESS_SCHEMA),
]
TargetField = Annotated[
    AddressTemplate,
    BeforeValidator(_parse_template),
    PlainSerializer(lambda t: t.text, return_type=str),
    WithJsonSchema(
        {"type": "string", "description": "an address; $label stands for a label value"}
    ),
]


Name = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")]
SignalName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
# A limit's value and what multiplies one are bounded so that a scaled limit stays a number:
# `scale: 1e308` × a baseline of 10 was infinity, which the resolver reads as "no limit" and
# deletes, serving the plan unrestricted. 10^15 is above any rate or budget (and below 2^53,
# so every whole limit stays exact in Lua and JSON); 10^15 × 10^6 is still finite.
MAX_LIMIT_VALUE = 1e15
MAX_SCALE = 1e6


def _at_most(bound: float, what: str, fix: str) -> AfterValidator:
    def check(value: float) -> float:
        if value > bound:
            raise ValueError(f"{value:g} is over {bound:g}, the most {what} may be: {fix}")
        return value

    return AfterValidator(check)


LimitValue = Annotated[
    NonNegativeNumber,
    _at_most(MAX_LIMIT_VALUE, "a limit", "write the largest value you mean, at most 1e15"),
    WithJsonSchema({"type": "number", "minimum": 0, "maximum": MAX_LIMIT_VALUE}),
]
Scale = Annotated[
    PositiveNumber,
    _at_most(MAX_SCALE, "a scale", "for a fixed value write `set:` instead"),
    WithJsonSchema({"type": "number", "exclusiveMinimum": 0, "maximum": MAX_SCALE}),
]
LimitValues = dict[LimitKind, LimitValue]
AddressValues = Annotated[dict[AddressField, LimitValue], BeforeValidator(distinct_addresses)]


def _check_terms(scope: Scope, values: LimitValues) -> None:
    """A share term (concurrent_headroom, concurrent_weight) where it may stand, with a value
    it may take: ValueError naming the term and where it goes."""
    for kind, value in values.items():
        problem = placement_problem(scope, kind, None) or value_problem(kind, value)
        if problem is not None:
            raise ValueError(problem)


class Metadata(Strict):
    name: Name
    description: str | None = None
    annotations: dict[str, str] = Field(default_factory=dict)

    @property
    def runbook(self) -> str | None:
        return self.annotations.get("runbook")


class PlanSpec(PlanTerms):
    """A plan: the catalog's terms (models, fail mode, degrade, credits) and its limits."""

    limits: LimitValues = Field(default_factory=dict)

    @model_validator(mode="after")
    def _terms_in_place(self) -> PlanSpec:
        _check_terms(Scope.PLAN, self.limits)
        return self

    @field_validator("models")
    @classmethod
    def _models_written_out(cls, models: list[str]) -> list[str]:
        # Written out and empty, the list read as "any model" (as absent does): a plan
        # emptied to take its models away opened every one of them. (A default is not
        # validated: a plan without the field still may call any model.)
        if not models:
            raise ValueError(
                "models: [] would let the plan call any model; list the models it may call, "
                "or leave `models` out to allow any (to refuse a plan's requests, set "
                "requests_per_minute: 0)"
            )
        return models


class BehaviorRule(Strict):
    """How fast a limit may move in one direction (the Kubernetes HPA `behavior` model)."""

    stabilization: Duration = Field(
        0.0, description="use the most cautious recommendation seen over this window"
    )
    max_change_percent: PositiveNumber | None = Field(
        None, description="largest change per period, in percent of the value at its start"
    )
    period: Duration = Field(60.0, gt=0)


class Behavior(Strict):
    tighten: BehaviorRule = Field(default_factory=BehaviorRule)
    loosen: BehaviorRule = Field(default_factory=lambda: BehaviorRule(stabilization=300.0))


class LimitsSpec(Strict):
    default_plan: Name
    global_: LimitValues = Field(default_factory=dict, alias="global")
    ip: LimitValues = Field(default_factory=dict)
    floors: AddressValues = Field(
        default_factory=dict, description="no automatic change may go below these"
    )
    ceilings: AddressValues = Field(
        default_factory=dict, description="no automatic change may go above these"
    )
    behavior: Behavior = Field(
        default_factory=Behavior, description="default behaviour for every limit"
    )

    @model_validator(mode="after")
    def _terms_in_place(self) -> LimitsSpec:
        _check_terms(Scope.GLOBAL, self.global_)
        _check_terms(Scope.IP, self.ip)
        for bounds in (self.floors, self.ceilings):
            for address, value in bounds.items():
                problem = value_problem(address.limit, value)
                if problem is not None:
                    raise ValueError(f"{address}: {problem}")
        return self

    @model_validator(mode="after")
    def _floors_under_ceilings(self) -> LimitsSpec:
        # A floor over its ceiling leaves no value both allow: which one wins would be an
        # accident of the resolver's order, not the operator's intent.
        for address, floor in self.floors.items():
            ceiling = self.ceilings.get(address)
            if ceiling is not None and floor > ceiling:
                raise ValueError(
                    f"the floor of {address} ({floor:g}) is above its ceiling ({ceiling:g})"
                )
        return self


RangeBound = Annotated[float, Field(allow_inf_nan=False), NotBoolean]


class SignalRange(Strict):
    """The values a signal can take; one outside is a fault (a unit mistaken, an exporter's
    bug), never a reading: a utilisation of -1 read as "far below the setpoint" loosened an
    AIMD limit up to its rail."""

    min: RangeBound | None = None
    max: RangeBound | None = None

    @model_validator(mode="after")
    def _ordered(self) -> SignalRange:
        if self.min is None and self.max is None:
            raise ValueError("a range needs `min`, `max` or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"range min ({self.min}) is above its max ({self.max})")
        return self

    def excludes(self, value: float) -> bool:
        """Whether a finite value lies outside (NaN is neither: it is not finite)."""
        return (self.min is not None and value < self.min) or (
            self.max is not None and value > self.max
        )

    def outside(self, values: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """Which finite values lie outside (NaN is neither: it is not finite)."""
        low = -np.inf if self.min is None else self.min
        high = np.inf if self.max is None else self.max
        with np.errstate(invalid="ignore"):
            return np.asarray((values < low) | (values > high), dtype=np.bool_)

    def describe(self) -> str:
        low = "" if self.min is None else f"{self.min:g}"
        high = "" if self.max is None else f"{self.max:g}"
        return f"{low}–{high}" if low and high else (f"≥ {low}" if low else f"≤ {high}")


class SignalSpec(Strict):
    query: Annotated[str, Field(min_length=1, max_length=MAX_QUERY_CHARS)]
    stale_after: Duration = Field(120.0, gt=0)
    absent: Literal["missing", "zero"] = Field(
        "missing",
        description="what a series that does not exist (yet) means: `missing` (untrustworthy, "
        "on_stale decides) or `zero` (a count of events that have not happened: read as 0)",
    )
    history: Duration | None = Field(
        None,
        gt=0,
        description="how far back the query reads (e.g. 23h for `offset 23h`): until "
        "Prometheus holds its series from that long ago, the signal is `no_history`, not stale",
    )
    valid_range: SignalRange | None = Field(
        None,
        alias="range",
        description="the values the signal can take ({min, max}, either or both): a value "
        "outside is `out_of_range`, untrustworthy as a stale one (on_stale decides)",
    )

    @field_validator("query")
    @classmethod
    def _query_parses(cls, query: str) -> str:
        # A query Prometheus' grammar does not take never yields a trusted value (the age of
        # its data cannot be told: signals.promql), so its policy would sit in on_stale for
        # good. Said here, at the query's line, before the set replaces a working one.
        try:
            parse(query)
        except ValueError as exc:
            raise ValueError(
                f"the query does not parse with Prometheus' grammar ({exc}): fix it, or move "
                "what the grammar does not know (a function of another Prometheus version) "
                "into a recording rule and read that"
            ) from None
        return query

    def key(self, by: str | None = None) -> SignalKey:
        """The query result this signal reads, keyed by `by` (a policy's `per:`)."""
        return SignalKey(self.query, by, self.absent == "zero", self.history or 0.0)


class Action(Strict):
    target: TargetField
    scale: Scale | None = Field(None, description="multiply the baseline")
    set: LimitValue | None = Field(None, description="use this value")
    min: LimitValue | None = None
    max: LimitValue | None = None

    @model_validator(mode="after")
    def _one_operation(self) -> Action:
        if (self.scale is None) == (self.set is None):
            raise ValueError("an action needs exactly one of `scale` or `set`")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) is above max ({self.max})")
        for value in (self.set, self.min, self.max):
            problem = None if value is None else value_problem(self.target.limit, value)
            if problem is not None:
                raise ValueError(f"{self.target.text}: {problem}")
        return self


class Schedule(Strict):
    timezone: str = "UTC"
    windows: list[
        Annotated[
            Window,
            BeforeValidator(parse_window),
            PlainSerializer(str, return_type=str),
            WithJsonSchema(
                {"type": "string", "description": "DAYS HH:MM-HH:MM, e.g. Mon-Fri 08:00-20:00"}
            ),
        ]
    ] = Field(min_length=1)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        # Checked against the tz database's list, never opened by name: a name is a path
        # below the database, and a long or odd one made ZoneInfo raise OSError.
        if value not in _time_zones():
            raise ValueError(
                f"unknown time zone {value[:80]!r}: use an IANA name like Europe/Berlin or UTC"
            )
        return value


@cache
def _time_zones() -> frozenset[str]:
    # Debian's database also lists `localtime`, a link to the host's /etc/localtime: a
    # schedule in it would follow whichever host reads the file, so it names no zone.
    return frozenset(available_timezones()) - {"localtime"}


class OnStale(Strict):
    """What to do while a signal cannot be trusted (empty, NaN, stale, query failing)."""

    hold_for: Duration = Field(120.0, description="keep the last decision this long")
    then: Literal["baseline", "min", "hold"] = Field(
        "baseline",
        description="afterwards: back to the baseline, the most restrictive value, or hold",
    )


class Alert(Strict):
    severity: Literal["info", "warning", "critical"] = "warning"


def _compile(text: str | None, info: ValidationInfo) -> Expression | None:
    if text is None or "signals" not in info.data:
        # Signals that failed validation are reported on their own; naming every signal
        # of the condition as unknown on top of that would only mislead.
        return None
    signals = info.data["signals"]
    known = set(signals) if isinstance(signals, dict) else set()
    try:
        return compile_expression(text, known)
    except ExpressionError as exc:
        raise ValueError(str(exc)) from None


def _same_text(a: str, b: str) -> bool:
    """Whether two CEL expressions are written the same but for spaces."""
    return "".join(a.split()) == "".join(b.split())


class ThrottlePolicySpec(Strict):
    per: SignalName | None = Field(None, description="evaluate once per value of this label")
    signals: dict[SignalName, SignalSpec] = Field(default_factory=dict)
    when: str | None = Field(None, description="CEL over the signals; absent means always")
    for_: Duration = Field(0.0, alias="for", description="the condition must hold this long")
    until: str | None = Field(None, description="CEL; once active, stay active until it holds")
    cooldown: Duration = Field(0.0, description="after a release, wait this long to re-engage")
    actions: list[Action] = Field(min_length=1)
    schedule: Schedule | None = None
    on_stale: OnStale = Field(default_factory=OnStale)
    behavior: Behavior | None = None
    alert: Alert | None = None

    _when: Expression | None = PrivateAttr(None)
    _until: Expression | None = PrivateAttr(None)

    @field_validator("when", "until")
    @classmethod
    def _valid_condition(cls, value: str | None, info: ValidationInfo) -> str | None:
        _compile(value, info)
        return value

    @model_validator(mode="after")
    def _compiled(self) -> ThrottlePolicySpec:
        names = set(self.signals)
        self._when = compile_expression(self.when, names) if self.when is not None else None
        self._until = compile_expression(self.until, names) if self.until is not None else None
        if self.until is not None and self.when is not None and _same_text(self.until, self.when):
            # Engaged because `when` holds, it would release at once for the same reason:
            # engage, release, cool down, engage again — the policy flaps by construction.
            raise ValueError(
                "`until` is the same condition as `when`: the policy would release on the tick "
                "it engaged; leave `until` out to release when `when` stops holding, or give "
                "the release condition (e.g. when: 'x > 0.9', until: 'x < 0.75')"
            )
        for number, action in enumerate(self.actions):
            unknown = [p for p in action.target.placeholders if p != self.per]
            if unknown:
                hint = f"`per: {unknown[0]}`" if self.per is None else f"`${self.per}`"
                raise ValueError(
                    f"actions[{number}].target {action.target.text!r} uses ${unknown[0]}, "
                    f"which only a policy with {hint} can fill"
                )
        if self.per is not None and not self.signals:
            raise ValueError(f"`per: {self.per}` needs at least one signal keyed by that label")
        return self

    @property
    def when_expression(self) -> Expression | None:
        return self._when

    @property
    def until_expression(self) -> Expression | None:
        return self._until

    @property
    def engage_names(self) -> frozenset[str]:
        """The signals that decide engagement (`when`): they must be trustworthy to engage."""
        return self._when.names if self._when is not None else frozenset()

    @property
    def release_names(self) -> frozenset[str]:
        """The signals that decide release: `until`'s, else `when`'s."""
        return self._until.names if self._until is not None else self.engage_names


class AimdSpec(Strict):
    increase: PositiveNumber = Field(description="added per tick while below the setpoint")
    decrease_factor: Annotated[float, Field(gt=0, lt=1), NotBoolean] = Field(
        description="multiplied per tick while above the setpoint"
    )
    tolerance: NonNegativeNumber = Field(0.0, description="dead band around the setpoint")


class GradientSpec(Strict):
    """new = value × clamp(setpoint / signal, 1 - max_step, 1 + max_step), smoothed."""

    max_step: Annotated[float, Field(gt=0, le=1), NotBoolean] = 0.25
    smoothing: Annotated[float, Field(gt=0, le=1), NotBoolean] = 0.5
    tolerance: NonNegativeNumber = 0.0


class Bounds(Strict):
    min: LimitValue
    max: LimitValue

    @model_validator(mode="after")
    def _ordered(self) -> Bounds:
        if self.min > self.max:
            raise ValueError(f"bounds.min ({self.min}) is above bounds.max ({self.max})")
        return self


class AdaptiveSignal(SignalSpec):
    name: SignalName | None = Field(
        None, description="how tests and the journal call it; default `signal`"
    )
    window: Duration | None = Field(
        None,
        description="the span of time one sample describes (a gauge: the scrape interval; "
        "`rate(x[1m])`: 1m): after a cut, a sample no later than the cut + this cannot show "
        "it and is not acted on; default: the observed time between two samples",
    )


class FilterSpec(Strict):
    """Smooth a noisy signal before the control law reads it (per sample, not per tick)."""

    smoothing: Annotated[float, Field(gt=0, le=1), NotBoolean] = Field(
        0.3,
        description="weight of each new sample in an exponentially weighted moving average "
        "(1: no smoothing)",
    )
    noise_band: NonNegativeNumber = Field(
        2.0,
        description="widen the tolerance to this many standard deviations of the filtered "
        "signal's noise, measured online from the samples (0: the tolerance alone)",
    )
    jump_band: NonNegativeNumber = Field(
        4.0,
        description="a sample this many standard deviations of the noise away from the "
        "filtered value is a real change, not noise: the filter restarts from it, so a burst "
        "is acted on at once (0: never)",
    )


class LatencySpec(Strict):
    """Let the queue's wait follow a measured latency: the wait shrinks while the latency is
    above its objective and grows while a queue forms and the latency stays below it; with
    the wait at its shortest and the latency still above, the pool is held below full."""

    signal: AdaptiveSignal = Field(
        description="the latency the objective is about, in seconds, e.g. the p99 TTFT: "
        "`histogram_quantile(0.99, sum by (le) "
        "(rate(vllm:time_to_first_token_seconds_bucket[2m])))`"
    )
    objective: Duration = Field(gt=0, description="what `signal` must stay under (the SLO)")
    min_wait: Duration | None = Field(
        None, gt=0, description="the shortest wait it may come to; default objective ÷ 20"
    )
    max_wait: Duration | None = Field(
        None, gt=0, description="the longest wait it may come to; default the objective"
    )
    min_fill: Annotated[float, Field(gt=0, le=1), NotBoolean] = Field(
        0.25,
        description="while the latency stays far above its objective (`cut_fill_above`) "
        "with the wait at its shortest, the pool is held below full: at least this share of "
        "its capacity (1: never below full)",
    )
    cut_fill_above: Annotated[float, Field(ge=1, le=10), NotBoolean] = Field(
        2.0,
        description="the latency, as a multiple of the objective, above which the pool is "
        "held below full; it fills again below the objective (a tail a little above it is "
        "the price of serving the most within it)",
    )

    @property
    def wait_range(self) -> tuple[float, float]:
        low = self.min_wait if self.min_wait is not None else self.objective / 20
        high = self.max_wait if self.max_wait is not None else self.objective
        return low, high

    @model_validator(mode="after")
    def _ordered(self) -> LatencySpec:
        low, high = self.wait_range
        if low > high:
            raise ValueError(
                f"queue.latency.min_wait ({low}s) must not be above max_wait ({high}s)"
            )
        return self


class QueueSpec(Strict):
    """The queue an in-flight limit may let form beyond a full pool, from the TTFT SLO: by
    Little's law a queue of `arrivals` × `wait` requests waits `wait` on average."""

    wait: Duration = Field(
        gt=0,
        description="the wait for a first token the SLO leaves to queueing (e.g. a quarter "
        "of it); with `latency`, where the wait starts",
    )
    arrivals: AdaptiveSignal = Field(
        description="the requests admitted per second, e.g. "
        '`sum(rate(gateway_requests_total{outcome="allow"}[2m]))`'
    )
    latency: LatencySpec | None = Field(
        None,
        description="let the wait follow a measured latency (the TTFT against its SLO) "
        "instead of staying at `wait`",
    )

    @model_validator(mode="after")
    def _wait_in_range(self) -> QueueSpec:
        if self.latency is not None:
            low, high = self.latency.wait_range
            if not low <= self.wait <= high:
                raise ValueError(
                    f"queue.wait ({self.wait}s) must lie within queue.latency's wait range "
                    f"{low}s–{high}s (min_wait–max_wait; defaults objective ÷ 20 to objective)"
                )
        return self


class CapacitySpec(Strict):
    """Seek the serving capacity online instead of writing it into the bounds. By the
    utilization law (U = X / C), a utilization signal U caused by the admitted throughput X
    says the capacity is C = X / U; the limit is set to C × setpoint, so it follows the pool
    whatever its size, and binds from the first second of a burst."""

    throughput: AdaptiveSignal = Field(
        description="the throughput admitted, in the target's unit (requests/s for a "
        "requests_per_second target), over the same span as one sample of `signal` "
        '(e.g. `sum(irate(gateway_requests_total{outcome="allow"}[5m]))`)'
    )
    saturated: Annotated[float, Field(gt=0, le=4), NotBoolean] = Field(
        0.95,
        description="a sample of `signal` at or above this is saturation (a queue): it "
        "says nothing about the capacity, and the algorithm cuts from the lower of the value "
        "in force and the estimate × setpoint; up to 4 for an occupancy signal that counts a "
        "queue beyond 1 (a full cache at 1.0)",
    )
    min_signal: Annotated[float, Field(ge=0, lt=1), NotBoolean] = Field(
        0.05, description="below this utilization X / U is mostly noise: not estimated"
    )
    smoothing: Annotated[float, Field(gt=0, le=1), NotBoolean] = Field(
        0.3, description="weight of each new estimate in an exponentially weighted average"
    )
    queue: QueueSpec | None = Field(
        None,
        description="add the queue the TTFT SLO allows to the limit (arrivals × wait): for "
        "an in-flight target, with the setpoint at a full pool",
    )
    hold_below: Annotated[float, Field(ge=0, lt=1), NotBoolean] = Field(
        0.0,
        description="while the throughput is below this share of the limit (the value in "
        "force and the one aimed at, the lower), the limit binds nothing: a new estimate does "
        "not move it unless the pool is overloaded (light-load estimates are noisy; each turn "
        "is a flap; e.g. 0.5). 0 (the default): every estimate beyond the noise band moves it",
    )

    @model_validator(mode="after")
    def _ordered(self) -> CapacitySpec:
        if self.min_signal >= self.saturated:
            raise ValueError(
                f"capacity.min_signal ({self.min_signal}) must be below capacity.saturated "
                f"({self.saturated})"
            )
        return self


class AdaptiveLimitSpec(Strict):
    target: AddressField
    signal: AdaptiveSignal
    setpoint: Annotated[float, NotBoolean] = Field(allow_inf_nan=False)
    algorithm: Literal["aimd", "gradient"] = "aimd"
    aimd: AimdSpec | None = None
    gradient: GradientSpec | None = None
    bounds: Bounds
    filter: FilterSpec | None = Field(
        None, description="smooth the signal and widen the dead band to its noise"
    )
    capacity: CapacitySpec | None = Field(
        None,
        description="set the limit from the capacity estimated online (`signal` must then "
        "be proportional to the work served: a utilization, 0–1, or an occupancy whose 1.0 "
        "is full and whose excess is a queue)",
    )
    behavior: Behavior | None = None
    on_stale: OnStale = Field(default_factory=OnStale)
    schedule: Schedule | None = None

    @model_validator(mode="after")
    def _algorithm_settings(self) -> AdaptiveLimitSpec:
        if self.algorithm == "aimd" and self.aimd is None:
            raise ValueError("algorithm `aimd` needs an `aimd:` block (increase, decrease_factor)")
        if self.algorithm == "gradient" and self.gradient is None:
            object.__setattr__(self, "gradient", GradientSpec())
        if self.capacity is not None and not 0 < self.setpoint < self.capacity.saturated:
            raise ValueError(
                f"with `capacity:` the setpoint is a utilization: it must be above 0 and below "
                f"capacity.saturated ({self.capacity.saturated}), not {self.setpoint}"
            )
        return self

    @property
    def signal_name(self) -> str:
        return self.signal.name or "signal"


class FairShareSpec(Strict):
    """Split a shared limit among the tenants by weight while it binds (weighted max-min
    fairness, water-filling): a tenant asking less than its share is not limited, the others
    are held to theirs, and the shares add up to the shared limit."""

    level: AddressField = Field(
        description="the shared limit whose value in force is split (global or plan scope)"
    )
    target: TargetField = Field(
        description="each tenant's limit in the level's unit: tenant/$tenant/<the level's limit>"
    )
    demand: SignalSpec = Field(
        description="each tenant's demand in the target's unit, keyed by the `tenant` label "
        "(what it would use if nothing held it back: a capped tenant's use is its cap)"
    )
    weights: dict[Name, PositiveNumber] = Field(
        default_factory=dict, description="weight by plan (the tenant registry's plan)"
    )
    default_weight: PositiveNumber = Field(1.0, description="the weight of a plan not listed")
    engage_at: Annotated[float, Field(gt=0), NotBoolean] = Field(
        0.9,
        description="contention: the demands add up to at least this share of the level; "
        "below it no tenant is limited by this policy",
    )
    reserve: NonNegativeNumber = Field(
        2.0,
        description="for concurrency: keep this many standard deviations of the requests the "
        "tenants not held have in flight free for their swings (a count in flight varies as "
        "a Poisson count: its variance is its mean), so they are not refused at the level; "
        "0: none",
    )
    swing: NonNegativeNumber = Field(
        1.0,
        description="for concurrency: a tenant's swing in standard deviations of its own "
        "count in flight (√ of its share): it is held only when its demand exceeds its share "
        "of the level by more than that (or it is held already and still asks more than its "
        "share of the level), and a new share within that of its limit in force keeps the "
        "limit; below it a cap clips the count's noise while the pool has room; 0: any excess",
    )
    tolerance: NonNegativeNumber = Field(
        0.2,
        description="a tenant's new share within this fraction of its limit in force (for "
        "concurrency: at least one request, and at least its swing) keeps that limit, so "
        "the shares do not turn with every noisy sample",
    )
    behavior: Behavior | None = None

    @model_validator(mode="after")
    def _fits(self) -> FairShareSpec:
        level, target = self.level, self.target
        if level.scope not in (Scope.GLOBAL, Scope.PLAN):
            raise ValueError(
                f"level {str(level)!r} is not shared by tenants: use a global or plan limit, "
                "e.g. global/concurrent_requests"
            )
        if target.placeholders != ("tenant",) or not target.text.startswith("tenant/$tenant/"):
            raise ValueError(
                f"target {target.text!r} must be each tenant's limit: tenant/$tenant/<limit>"
            )
        probe = target.fill({"tenant": "x"})
        if probe.limit is not level.limit or probe.model != level.model:
            raise ValueError(
                f"target {target.text!r} and level {str(level)!r} must be the same limit "
                f"(the shares of {level.limit}{'@' + level.model if level.model else ''} add "
                "up to the level)"
            )
        return self


class _Document(Strict):
    api_version: Literal["governor/v1"] = Field(alias="apiVersion")
    metadata: Metadata

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def ref(self) -> str:
        """`Kind/name`, how journal events and `explain` name a policy."""
        # Interned: 100k proposals, decisions and resolver memories each hold one.
        return sys.intern(f"{self.kind}/{self.metadata.name}")  # type: ignore[attr-defined]


class Plan(_Document):
    kind: Literal["Plan"]
    spec: PlanSpec = Field(default_factory=PlanSpec)


class Limits(_Document):
    kind: Literal["Limits"]
    spec: LimitsSpec


class ThrottlePolicy(_Document):
    kind: Literal["ThrottlePolicy"]
    spec: ThrottlePolicySpec


class AdaptiveLimit(_Document):
    kind: Literal["AdaptiveLimit"]
    spec: AdaptiveLimitSpec


class FairShare(_Document):
    kind: Literal["FairShare"]
    spec: FairShareSpec


Document = Annotated[
    Plan | Limits | ThrottlePolicy | AdaptiveLimit | FairShare, Field(discriminator="kind")
]
KINDS: tuple[str, ...] = ("Plan", "Limits", "ThrottlePolicy", "AdaptiveLimit", "FairShare")


class DocumentFile(BaseModel):
    """Wraps one YAML document so pydantic dispatches on `kind`."""

    model_config = ConfigDict(extra="forbid")
    document: Document


def json_schema() -> dict[str, Any]:
    """A JSON Schema for one policy document, for editors (yaml-language-server)."""
    schema = DocumentFile.model_json_schema(by_alias=True)
    document = schema["properties"]["document"]
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "Governor policy document (governor/v1)",
        **{k: v for k, v in document.items() if k != "title"},
        "$defs": schema.get("$defs", {}),
    }
