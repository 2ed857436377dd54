"""Pure data types shared by every layer: limit addresses, signal snapshots, proposals."""

from __future__ import annotations

import enum
import math
import re
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

FloatArray: TypeAlias = npt.NDArray[np.float64]


class LimitKind(enum.StrEnum):
    """What a limit counts. `tokens_per_day` is a budget: exhausting it answers 402."""

    REQUESTS_PER_SECOND = "requests_per_second"
    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    TOKENS_PER_DAY = "tokens_per_day"
    CONCURRENT_REQUESTS = "concurrent_requests"
    MAX_TOKENS_PER_REQUEST = "max_tokens_per_request"
    # Not limits but how a concurrency limit is shared: `global/concurrent_headroom` (a ratio)
    # lets a tenant within its weighted share go that much above global/concurrent_requests;
    # `plan/…` or `tenant/…/concurrent_weight` is the tenant's weight there (default 1).
    CONCURRENT_HEADROOM = "concurrent_headroom"
    CONCURRENT_WEIGHT = "concurrent_weight"


class Scope(enum.StrEnum):
    """Who a limit applies to, from the widest to the narrowest."""

    GLOBAL = "global"
    IP = "ip"
    PLAN = "plan"
    TENANT = "tenant"
    USER = "user"


class AddressError(ValueError):
    """A limit address that does not follow `scope/[ids/]limit[@model]`."""

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"invalid limit address {text!r}: {problem}")
        self.text = text
        self.problem = problem


# Ids come from tenants' own systems and are untrusted: only characters that can never be
# mistaken for a separator (`/`, `@`), a Redis hash tag (`{}`), a glob (`*?[]`) or a
# placeholder (`$`) are allowed.
_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+=~-]{0,127}")
# What a label value filled into an id's place may hold (the whole id is checked once parsed).
_ID_CHARS = re.compile(r"[A-Za-z0-9._:+=~-]+")
# A model name as model servers spell it, Hugging Face's `org/name` included (vLLM serves a
# model under its repository id unless told otherwise): the `@` before it ends the address's
# path, so a `/` inside the name is no separator.
_MODEL_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*(?:/[A-Za-z0-9._:-]+)*")
MODEL_NAME_MAX = 200
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_PLACEHOLDER_PATTERN = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)")
_IDS_PER_SCOPE: dict[Scope, tuple[str, ...]] = {
    Scope.GLOBAL: (),
    Scope.IP: (),
    Scope.PLAN: ("plan",),
    Scope.TENANT: ("tenant",),
    Scope.USER: ("tenant", "user"),
}


def model_key(model: str) -> str:
    """The form a model name is limited and priced under: ASCII letters in lower case (as Lua's
    `string.lower` makes them), so `GPT-4` meets the limits written for `@gpt-4` instead of
    slipping past them on a model server or router that does not tell case apart."""
    return model.translate(_ASCII_LOWER)


def validate_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a safe identifier segment, else raise ValueError naming it."""
    if not _ID_PATTERN.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1-128 characters of letters, digits and ._:+=~- "
            "starting with a letter or digit"
        )
    return value


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """Where a limit lives, e.g. `tenant/acme/tokens_per_minute@gpt-4`."""

    scope: Scope
    limit: LimitKind
    plan: str | None = None
    tenant: str | None = None
    user: str | None = None
    model: str | None = None
    # The hash, computed once: addresses key every per-limit dict, millions of lookups a
    # tick at 100k tenants, and the generated __hash__ builds a tuple of six fields each time.
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fields = (self.scope, self.limit, self.plan, self.tenant, self.user, self.model)
        object.__setattr__(self, "_hash", hash(fields))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[Address], tuple[object, ...]]:
        # Rebuilt, not restored: a string's hash differs from one process to the next.
        return Address, (self.scope, self.limit, self.plan, self.tenant, self.user, self.model)

    @classmethod
    def parse(cls, text: str) -> Address:
        """Parse the canonical text form; raise AddressError naming what is wrong."""
        if not isinstance(text, str) or not text:
            raise AddressError(str(text), "an address is a non-empty string")
        body, at, model = text.partition("@")
        if at and (len(model) > MODEL_NAME_MAX or not _MODEL_PATTERN.fullmatch(model)):
            raise AddressError(
                text,
                f"model {model!r} after '@' is not a valid model name (1-{MODEL_NAME_MAX} "
                "letters, digits and ._:- in parts split by single '/', e.g. "
                "gpt-4o or meta-llama/Llama-3.1-8B-Instruct)",
            )
        parts = body.split("/")
        scope = _scope(text, parts[0])
        names = _IDS_PER_SCOPE[scope]
        if len(parts) != len(names) + 2:
            raise AddressError(text, f"expected the shape {_shape_of(scope)}")
        try:
            limit = LimitKind(parts[-1])
        except ValueError:
            raise AddressError(
                text,
                f"limit {parts[-1]!r} is not one of {', '.join(k.value for k in LimitKind)}",
            ) from None
        problem = placement_problem(scope, limit, model if at else None)
        if problem is not None:
            raise AddressError(text, problem)
        ids = _ids(text, names, parts[1:-1])
        return cls(scope=scope, limit=limit, model=model_key(model) if at else None, **ids)

    @classmethod
    def check_prefix(cls, text: str) -> str:
        """`text` when it is the start of an address, whole segments up to the limit (`tenant/`,
        `tenant/acme`, `global/`) or the whole address; else the AddressError `parse` raises
        for the same mistake. A filter (`governor audit tail --address`, `limits get`) that
        no address can start with would match nothing and say only "0 events"."""
        trimmed = text.removesuffix("/")
        parts = trimmed.split("/")
        scope = _scope(text, parts[0])
        names = _IDS_PER_SCOPE[scope]
        if "@" in text or len(parts) > len(names) + 1:
            cls.parse(text)  # it reaches the limit: the whole address, checked as one
        else:
            _ids(text, names, parts[1:])
        return text

    def __str__(self) -> str:
        ids = [getattr(self, name) for name in _IDS_PER_SCOPE[self.scope]]
        text = "/".join([self.scope.value, *ids, self.limit.value])
        return f"{text}@{self.model}" if self.model else text

    def without_model(self) -> Address:
        """The same address with no `@model` narrowing."""
        return Address(self.scope, self.limit, self.plan, self.tenant, self.user)


def interned(text: str) -> Address:
    """`Address.parse`, one instance per address text in the process: the engine's targets
    and the sink's read-back share it instead of holding a parsed copy each (100k tenants).
    A plain dict, not an lru_cache: its per-entry links cost as much as the addresses."""
    found = _INTERNED.get(text)
    if found is None:
        found = Address.parse(text)
        if len(_INTERNED) >= INTERNED_MAX:
            _INTERNED.clear()  # addresses gone for good (tenants churn): start over
        _INTERNED[text] = found
    return found


# Beyond any deployment's limits; past it the table is rebuilt as addresses are met again.
INTERNED_MAX = 1 << 20
_INTERNED: dict[str, Address] = {}


# How a concurrency limit is shared (docs/enforcement.md, "Sharing the in-flight limit by
# weight"): where each term may be written, and its range. A term is no limit: 0 would not
# mean "shed"; a headroom above 1 or a weight far out of scale is no share anyone meant.
_SHARE_TERMS: dict[LimitKind, tuple[frozenset[Scope], tuple[float, float], str]] = {
    LimitKind.CONCURRENT_HEADROOM: (
        frozenset({Scope.GLOBAL}),
        (0.001, 1.0),
        "global/concurrent_headroom (a share of global/concurrent_requests)",
    ),
    LimitKind.CONCURRENT_WEIGHT: (
        frozenset({Scope.PLAN, Scope.TENANT}),
        (0.001, 1_000_000.0),
        "plan/<plan>/concurrent_weight or tenant/<tenant>/concurrent_weight",
    ),
}


def under_prefix(address: str, prefix: str) -> bool:
    """Whether `address` lies under a filter `Address.check_prefix` accepts, by whole
    segments: `tenant/acme` holds `tenant/acme/…` (and `tenant/acme/limit@model`), never
    `tenant/acmecorp/…` — a filter that shows a tenant its own events must not show another's."""
    if not prefix or prefix.endswith("/"):
        return address.startswith(prefix)
    return address == prefix or address.startswith((f"{prefix}/", f"{prefix}@"))


def placement_problem(scope: Scope, limit: LimitKind, model: str | None) -> str | None:
    """Why `limit` cannot be written at `scope` (or for one model); None when it can."""
    terms = _SHARE_TERMS.get(limit)
    if terms is None:
        return None
    scopes, _, shape = terms
    if scope not in scopes or model:
        return f"{limit.value} is written only as {shape}"
    return None


def term_range(limit: LimitKind) -> tuple[float, float] | None:
    """The values a sharing term may take (both ends included); None for a limit (any
    number >= 0, 0 sheds)."""
    terms = _SHARE_TERMS.get(limit)
    return None if terms is None else terms[1]


def value_problem(limit: LimitKind, value: float) -> str | None:
    """Why `value` cannot be written for `limit`; None when it can."""
    bounds = term_range(limit)
    if bounds is None or bounds[0] <= value <= bounds[1]:
        return None
    return f"{limit.value} must be between {bounds[0]:.10g} and {bounds[1]:.10g}"


def weight_in_flight(weight: float, active: float, joined: float | None) -> float:
    """The weight a tenant's share of a limit shared by weight is taken against (admit.lua's
    f check): the weight in flight with the tenant's own as it is now. `active`: the weight
    in flight as stored; `joined`: the weight the tenant joined it with (None: it has
    nothing in flight). Its share is the limit × `weight` ÷ this."""
    others = active if joined is None else active - joined
    return max(others, 0.0) + weight


def _scope(text: str, name: str) -> Scope:
    """The scope `name` of address `text`, or AddressError naming the scopes."""
    try:
        return Scope(name)
    except ValueError:
        raise AddressError(
            text, f"scope {name!r} is not one of {', '.join(s.value for s in Scope)}"
        ) from None


def _ids(text: str, names: tuple[str, ...], values: list[str]) -> dict[str, str]:
    """The ids of address `text` by name (as many as given, in order), each a safe id, or
    AddressError naming the one that is not."""
    ids: dict[str, str] = {}
    for name, value in zip(names, values, strict=False):
        try:
            ids[name] = validate_id(value, name)
        except ValueError as exc:
            raise AddressError(text, str(exc)) from None
    return ids


def _shape_of(scope: Scope) -> str:
    return "/".join([scope.value, *(f"<{n}>" for n in _IDS_PER_SCOPE[scope]), "<limit>"])


def _shortened(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True, slots=True)
class AddressTemplate:
    """A policy target that may hold `$label` placeholders, filled per label value."""

    text: str
    placeholders: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> AddressTemplate:
        """Check that the template becomes a valid address whatever safe id fills it."""
        placeholders = tuple(dict.fromkeys(_PLACEHOLDER_PATTERN.findall(text)))
        probe = _PLACEHOLDER_PATTERN.sub("x", text)
        try:
            Address.parse(probe)
        except AddressError as exc:
            raise AddressError(text, exc.problem) from None
        return cls(text=text, placeholders=placeholders)

    @property
    def limit(self) -> LimitKind:
        """What every address it becomes counts."""
        return Address.parse(_PLACEHOLDER_PATTERN.sub("x", self.text)).limit

    def fill(self, values: Mapping[str, str]) -> Address:
        """Substitute label values; raise AddressError when a value is not a safe id (or, after
        the `@`, a model name). Label values come from Prometheus, whose series anyone who
        can put a label on a metric names: checked whole before the address is parsed, since
        a `/` or `@` inside one would make another address parse (`acme/rpm@x` filled into
        `tenant/$tenant/tpm` is tenant acme's `rpm@x/tpm`) — another tenant's limit."""
        at = self.text.find("@")

        def value(match: re.Match[str]) -> str:
            name, text = match.group(1), values[match.group(1)]
            in_model = 0 <= at < match.start()
            if not (_MODEL_PATTERN if in_model else _ID_CHARS).fullmatch(text):
                rule = "a model name" if in_model else "a safe id (letters, digits and ._:+=~-)"
                raise AddressError(
                    self.text, f"label value {_shortened(text)!r} for ${name} is not {rule}"
                )
            return text

        return interned(_PLACEHOLDER_PATTERN.sub(value, self.text))


class Validity(enum.StrEnum):
    """Why a signal value can or cannot be trusted. Anything but OK is never read as 0."""

    OK = "ok"
    EMPTY = "empty"  # the query returned no series
    NOT_FINITE = "not_finite"  # NaN or ±Inf
    OUT_OF_RANGE = "out_of_range"  # finite, but outside the range the signal declares
    STALE = "stale"  # the sample is older than the signal's stale_after
    ERROR = "error"  # the query failed (syntax, timeout, 5xx, connection refused)
    MISSING = "missing"  # a vector has no value for this label value
    PARTIAL = "partial"  # Prometheus answered with warnings (some data unavailable)
    # The query reads further back (`history:`) than Prometheus holds its data: a fresh
    # install, not a fault. Untrustworthy like the others, but not stale (docs/signals.md).
    NO_HISTORY = "no_history"


@dataclass(frozen=True, slots=True)
class ScalarSample:
    """One value of a query that returns a single number."""

    value: float
    timestamp: float  # unix seconds of the sample, not of the query
    validity: Validity = Validity.OK
    detail: str = ""


@dataclass(frozen=True, slots=True)
class VectorSample:
    """A query result keyed by one label (tenant, plan, model, pool...), as arrays."""

    label: str
    keys: tuple[str, ...]
    values: FloatArray
    timestamps: FloatArray
    validity: Validity = Validity.OK  # of the result as a whole (ERROR → every key invalid)
    detail: str = ""
    _index: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def index(self) -> Mapping[str, int]:
        """Key → position, built once on first use."""
        if not self._index and self.keys:
            self._index.update({key: i for i, key in enumerate(self.keys)})
        return self._index


Sample: TypeAlias = ScalarSample | VectorSample


@dataclass(frozen=True, slots=True)
class SignalKey:
    """Identifies one query result: queries run once per tick, however many use them."""

    query: str
    by: str | None = None  # the label a vector result is keyed by (the policy's `per:`)
    # `absent: zero`: a selector without any series is an event not yet seen, read as 0.
    absent_zero: bool = False
    history: float = 0.0  # `history:` in seconds: how far back the query reads (0: now)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every signal value the engine sees in one tick."""

    taken_at: float
    samples: Mapping[SignalKey, Sample]


@dataclass(frozen=True, slots=True)
class SignalReading:
    """The value of one named signal that fired (or blocked) a proposal, for the journal."""

    name: str
    value: float
    timestamp: float
    validity: Validity = Validity.OK


def fmt_number(value: float | None) -> str:
    """Six significant digits, `n/a` for a missing or NaN value (every reason reads so)."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.6g}"


class Quotes(Protocol):
    """A policy's signals over one tick, quoted per label value only when read: a tick
    proposes for every tenant and the readings of the few whose limit changes are read."""

    def readings(self, at: int) -> tuple[SignalReading, ...]: ...


@dataclass(frozen=True, slots=True, init=False, eq=False)
class Proposal:
    """One policy's wish for one address, with why."""

    address: Address
    value: float
    policy: str  # "<Kind>/<name>"
    # The readings, or where to quote them from (`Quotes`, at label value `at`).
    quoted: tuple[SignalReading, ...] | Quotes = field(repr=False)
    at: int = field(repr=False)
    # The reason as given; or, with `tail`, its head: the reason is then written when read,
    # as `head (name=value, ...)tail` quoting the signals. A tick proposes for every tenant
    # and reads the reasons of the few whose limit changes: 100k strings a tick otherwise.
    head: str = field(repr=False)
    tail: str | None = field(repr=False)

    def __init__(
        self,
        address: Address,
        value: float,
        policy: str,
        reason: str,
        signals: tuple[SignalReading, ...] | Quotes = (),
        *,
        tail: str | None = None,
        at: int = 0,
    ) -> None:
        put = object.__setattr__  # frozen: as the generated __init__ does
        put(self, "address", address)
        put(self, "value", value)
        put(self, "policy", policy)
        put(self, "quoted", signals)
        put(self, "at", at)
        put(self, "head", reason)
        put(self, "tail", tail)

    @property
    def signals(self) -> tuple[SignalReading, ...]:
        quoted = self.quoted
        return quoted if isinstance(quoted, tuple) else quoted.readings(self.at)

    @property
    def reason(self) -> str:
        if self.tail is None:
            return self.head
        shown = ", ".join([f"{r.name}={fmt_number(r.value)}" for r in self.signals])
        return (f"{self.head} ({shown})" if shown else self.head) + self.tail

    def _compared(self) -> tuple[object, ...]:
        return (self.address, self.value, self.policy, self.signals, self.head, self.tail)

    def __eq__(self, other: object) -> bool:
        # As the generated one would, but with the readings quoted (however they are held).
        if other is self:
            return True
        if not isinstance(other, Proposal):
            return NotImplemented
        return self._compared() == other._compared()

    def __hash__(self) -> int:
        return hash(self._compared())

    def __repr__(self) -> str:
        return (
            f"Proposal(address={self.address!r}, value={self.value!r}, policy={self.policy!r}, "
            f"reason={self.reason!r}, signals={self.signals!r})"
        )


@dataclass(frozen=True, slots=True)
class Override:
    """A person's pin on a limit, honoured until it expires."""

    address: Address
    value: float
    expires_at: float
    actor: str
    reason: str


class Source(enum.StrEnum):
    """Where a resolved limit value came from."""

    OVERRIDE = "override"  # a person pinned it
    POLICY = "policy"  # the most restrictive automatic proposal
    BASELINE = "baseline"  # a plan's or the Limits document's value
    FROZEN = "frozen"  # automation is frozen: the last value is kept
    PACING = "pacing"  # on its way back to the baseline at the pace `behavior` allows


@dataclass(frozen=True, slots=True, init=False)
class Decision:
    """The resolver's verdict for one address: the value to enforce and everything behind it."""

    address: Address
    value: float
    source: Source
    policy: str | None  # the winning policy, `Kind/name`
    # The reason, or the winning proposal whose reason it is (written when read: see
    # Proposal.reason).
    why: str | Proposal = field(repr=False)
    # The signals behind it, or the winning proposal that quotes them (read when read).
    quoted: tuple[SignalReading, ...] | Proposal = field(repr=False)
    proposals: tuple[Proposal, ...]  # every proposal that was considered
    baseline: float | None
    adjustments: tuple[str, ...]  # e.g. "floor 200", "loosen stabilization 5m"

    def __init__(
        self,
        address: Address,
        value: float,
        source: Source,
        policy: str | None,
        reason: str | Proposal,
        signals: tuple[SignalReading, ...] | Proposal = (),
        proposals: tuple[Proposal, ...] = (),
        baseline: float | None = None,
        adjustments: tuple[str, ...] = (),
    ) -> None:
        put = object.__setattr__  # frozen: as the generated __init__ does
        put(self, "address", address)
        put(self, "value", value)
        put(self, "source", source)
        put(self, "policy", policy)
        put(self, "why", reason)
        put(self, "quoted", signals)
        put(self, "proposals", proposals)
        put(self, "baseline", baseline)
        put(self, "adjustments", adjustments)

    @property
    def reason(self) -> str:
        why = self.why
        return why if isinstance(why, str) else why.reason

    @property
    def signals(self) -> tuple[SignalReading, ...]:
        quoted = self.quoted
        return quoted if isinstance(quoted, tuple) else quoted.signals
