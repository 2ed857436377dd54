"""The resolver: many proposals for one address → one value, moved at a safe pace.

Order of precedence: a person's override > the most restrictive automatic proposal >
the baseline. Automatic values are clamped to floors and ceilings, then paced per direction
as the Kubernetes HPA `behavior` paces replicas: a stabilization window (act on the most
cautious recommendation seen in the window) and a maximum change per period. Pure.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from controller.durations import format_duration
from controller.model import Address, Decision, Override, Proposal, Scope, Source, term_range
from controller.policy.baselines import Baselines
from controller.policy.documents import Behavior, BehaviorRule
from controller.policy.policyset import PolicySet
from controller.policy.text import fmt_number, fmt_time

UNLIMITED = math.inf
_EXPLICIT_SCOPES = (Scope.GLOBAL, Scope.IP, Scope.PLAN)


@dataclass(frozen=True, slots=True)
class AddressMemory:
    """What the resolver remembers per address: recent recommendations and values in force."""

    # One point per run of equal values, oldest first, so memory does not grow with the tick
    # rate: (last time recommended, value) and (time it came into force, value).
    recommendations: tuple[tuple[float, float], ...] = ()
    values: tuple[tuple[float, float], ...] = ()
    policy: str | None = None  # the last policy that won: its behaviour paces the way back

    @property
    def last(self) -> float | None:
        return self.values[-1][1] if self.values else None


@dataclass(frozen=True)
class ResolverState:
    memory: Mapping[Address, AddressMemory] = field(default_factory=dict)
    # The addresses last resolved, in order: most ticks resolve the same ones again, and
    # sorting 100k addresses is a tenth of a resolve.
    order: tuple[Address, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def seeded(cls, values: Mapping[Address, float], now: float) -> ResolverState:
        """Start from the values a sink holds (a new leader, a restart): pacing and
        stabilization continue from what is enforced instead of jumping to new values."""
        memory = {
            address: AddressMemory(((now, value),), ((now, value),))
            for address, value in values.items()
            if math.isfinite(value)
        }
        return cls(memory)

    def in_force(self) -> dict[Address, float]:
        """The last resolved value of every remembered address."""
        return {a: m.values[-1][1] for a, m in self.memory.items() if m.values}


@dataclass(frozen=True)
class Resolution:
    """The full desired state (explicit values only) and the resolver's next state."""

    desired: Mapping[Address, Decision]
    state: ResolverState


def resolve(
    policies: PolicySet,
    baselines: Baselines,
    proposals: Iterable[Proposal],
    overrides: Mapping[Address, Override],
    state: ResolverState,
    now: float,
    frozen: bool = False,
) -> Resolution:
    """Resolve every address that has a baseline, a proposal, an override or a memory."""
    # Most addresses have one proposal: held as a 1-tuple (the decision keeps it as is),
    # a list only for the few with several (a list per address is 100k lists a tick).
    by_address: dict[Address, tuple[Proposal] | list[Proposal]] = {}
    for proposal in proposals:
        found = by_address.get(proposal.address)
        if found is None:
            by_address[proposal.address] = (proposal,)
        elif isinstance(found, tuple):
            by_address[proposal.address] = [*found, proposal]
        else:
            found.append(proposal)
    stated = dict(policies.baseline_addresses())
    live_overrides = {a: o for a, o in overrides.items() if o.expires_at > now}
    addresses = set(by_address)  # one set, not one per source and their union (100k each)
    addresses.update(stated, live_overrides, state.memory)
    desired: dict[Address, Decision] = {}
    memory: dict[Address, AddressMemory] = {}
    remembered_before, none, forgotten = state.memory, (), AddressMemory()
    shared = _Shared(policies, now)
    order = _sorted(addresses, state.order)
    spec = policies.limits.spec
    floors, ceilings = spec.floors, spec.ceilings
    for address in order:
        baseline = stated[address] if address in stated else baselines.value(address)
        offered = by_address.get(address, none)
        override = live_overrides.get(address)
        before = remembered_before.get(address, forgotten)
        decision = None
        if (
            offered
            and override is None
            and not frozen
            and address not in floors
            and address not in ceilings
        ):
            decision, remembered = _steady(address, baseline, offered, before, now, shared)
        if decision is None:
            decision, remembered = _resolve_one(
                policies, address, baseline, offered, override, before, now, frozen, shared
            )
        if remembered.values and not _settled(remembered, baseline, address):
            memory[address] = remembered
        if decision is not None and _explicit(decision, address):
            desired[address] = decision
    return Resolution(desired=desired, state=ResolverState(memory, order))


def applied(
    policies: PolicySet,
    baselines: Baselines,
    proposals: Iterable[Proposal],
    overrides: Mapping[Address, Override],
    state: ResolverState,
    now: float,
    addresses: Iterable[Address],
    frozen: bool = False,
) -> dict[Address, float]:
    """The value `resolve` will apply to each of `addresses` on this tick (inf: no limit),
    given these proposals, without moving its state: a FairShare splits the level in force
    after this tick's override, pacing and bounds, not the level a controller proposed."""
    wanted = set(addresses)
    offered: dict[Address, list[Proposal]] = {a: [] for a in wanted}
    for proposal in proposals:
        if proposal.address in wanted:
            offered[proposal.address].append(proposal)
    stated = dict(policies.baseline_addresses())
    shared, forgotten = _Shared(policies, now), AddressMemory()
    out: dict[Address, float] = {}
    for address, mine in offered.items():
        override = overrides.get(address)
        live = override if override is not None and override.expires_at > now else None
        baseline = stated[address] if address in stated else baselines.value(address)
        memory = state.memory.get(address, forgotten)
        decision, _ = _resolve_one(
            policies, address, baseline, mine, live, memory, now, frozen, shared
        )
        out[address] = UNLIMITED if decision is None else decision.value
    return out


def _sorted(addresses: set[Address], last: tuple[Address, ...]) -> tuple[Address, ...]:
    """`addresses` in order: last tick's order when they are the same addresses."""
    if len(addresses) == len(last) and addresses.issuperset(last):
        return last
    return tuple(sorted(addresses, key=_order))


def _steady(
    address: Address,
    baseline: float | None,
    proposals: Sequence[Proposal],
    memory: AddressMemory,
    now: float,
    shared: _Shared,
) -> tuple[Decision | None, AddressMemory]:
    """`_resolve_one`'s answer, short, for an address whose winning proposal is the value
    in force (nothing to pace): most of them. (None, memory) for any other. The caller
    checks that no override, freeze, floor or ceiling applies."""
    winner = proposals[0] if len(proposals) == 1 else min(proposals, key=lambda p: p.value)
    value, values = winner.value, memory.values
    if not values or values[-1][1] != value or value == UNLIMITED:
        return None, memory
    since = shared.since(winner.policy)
    remembered = shared.memory(
        _recommend(memory.recommendations, now, value, since),
        _append(values, now, value, since),
        winner.policy,
    )
    decision = Decision(
        address=address,
        value=value,
        source=Source.POLICY,
        policy=winner.policy,
        reason=winner,
        signals=winner,
        proposals=tuple(proposals)
        if len(proposals) < 2
        else tuple(sorted(proposals, key=lambda p: (p.value, p.policy))),
        baseline=baseline,
    )
    return decision, remembered


class _Shared:
    """The memories of one resolve, equal ones made once: most of 100k tenants hold the same
    few values since the same ticks. Rebuilt per address every tick, their 100k small
    objects would be scattered among the tick's short-lived ones and keep the memory of
    the tick's peak allocated after it (an allocator arena is freed only when empty)."""

    def __init__(self, policies: PolicySet, now: float) -> None:
        self._policies, self._now = policies, now
        self._since: dict[str | None, float] = {}
        self._runs: dict[tuple[tuple[float, float], ...], tuple[tuple[float, float], ...]] = {}
        self._memories: dict[tuple[int, int, str | None], AddressMemory] = {}

    def memory(
        self,
        recommendations: tuple[tuple[float, float], ...],
        values: tuple[tuple[float, float], ...],
        policy: str | None,
    ) -> AddressMemory:
        # Equal runs of points made once, however many points (a limit that moved recently
        # has two or more, and all the limits that moved on one tick have the same ones).
        runs = self._runs
        recommendations = runs.setdefault(recommendations, recommendations)
        values = runs.setdefault(values, values)
        # By identity: the points are shared above, and the memory kept here holds them.
        key = (id(recommendations), id(values), policy)
        found = self._memories.get(key)
        if found is None:
            found = self._memories[key] = AddressMemory(recommendations, values, policy)
        return found

    def since(self, policy: str | None) -> float:
        """The start of the window the behaviour of `policy` remembers."""
        found = self._since.get(policy)
        if found is None:
            found = self._since[policy] = self._now - _horizon(self._policies.behavior_for(policy))
        return found


def _order(address: Address) -> tuple[str, ...]:
    """Address order as a tuple of strings: sorting 100k addresses by the dataclass's own
    comparison builds two tuples per comparison, this one tuple per address."""
    return (
        address.scope,
        address.limit,
        address.plan or "",
        address.tenant or "",
        address.user or "",
        address.model or "",
    )


def _explicit(decision: Decision, address: Address) -> bool:
    """Stated baselines are always written; others only when they differ from what they inherit."""
    if address.scope in _EXPLICIT_SCOPES and address.model is None:
        return True
    return decision.source is not Source.BASELINE or decision.value != decision.baseline


def _settled(memory: AddressMemory, baseline: float | None, address: Address) -> bool:
    """An inheriting address back at its baseline with no recent history can be forgotten."""
    if address.scope in _EXPLICIT_SCOPES and address.model is None:
        return False
    target = UNLIMITED if baseline is None else baseline
    return memory.last == target and all(value == target for _, value in memory.recommendations)


def _resolve_one(
    policies: PolicySet,
    address: Address,
    baseline: float | None,
    proposals: Sequence[Proposal],
    override: Override | None,
    memory: AddressMemory,
    now: float,
    frozen: bool,
    shared: _Shared,
) -> tuple[Decision | None, AddressMemory]:
    winner = (
        None
        if not proposals
        else proposals[0]
        if len(proposals) == 1
        else min(proposals, key=lambda p: p.value)
    )
    recommended = winner.value if winner else (UNLIMITED if baseline is None else baseline)
    adjustments: list[str] = []
    spec = policies.limits.spec
    if spec.floors or spec.ceilings:
        recommended = _clamp(policies, address, recommended, adjustments)
    behavior = policies.behavior_for(winner.policy if winner else memory.policy)
    horizon = _horizon(behavior)
    recommendations = _recommend(memory.recommendations, now, recommended, now - horizon)
    previous = memory.last
    reason: str | Proposal
    if override is not None:
        value, source = override.value, Source.OVERRIDE
        reason = (
            f"pinned by {override.actor} until {fmt_time(override.expires_at)}: {override.reason}"
        )
    elif frozen and previous is not None:
        value, source = previous, Source.FROZEN
        reason = "automation is frozen: keeping the value in force"
    else:
        value = _paced(behavior, recommended, recommendations, previous, now, memory, adjustments)
        if winner is not None:
            # The proposal itself: its reason is written only if someone reads it; unless
            # pacing or a floor changed the value, which the reason must then say (the
            # journal quotes it: a proposal's "+ 1 → 51" beside the 45 enforced misleads).
            source = Source.POLICY
            reason = winner if value == winner.value else _altered(winner, value, adjustments)
        elif value != recommended:
            source, reason = Source.PACING, f"returning to baseline {fmt_number(baseline)}"
        else:
            source, reason = Source.BASELINE, "no policy proposes a value: baseline"
    values = _append(memory.values, now, value, now - horizon)
    remembered = shared.memory(recommendations, values, winner.policy if winner else memory.policy)
    if value == UNLIMITED:
        return None, remembered
    decision = Decision(
        address=address,
        value=value,
        source=source,
        policy=winner.policy if winner and source is Source.POLICY else None,
        reason=reason,
        signals=winner if winner else (),  # quoted from it when read
        proposals=tuple(proposals)
        if len(proposals) < 2
        else tuple(sorted(proposals, key=lambda p: (p.value, p.policy))),
        baseline=baseline,
        adjustments=tuple(adjustments),
    )
    return decision, remembered


def _altered(winner: Proposal, value: float, adjustments: list[str]) -> str:
    """The reason of a decision whose value is not the winning proposal's."""
    why = "; ".join(adjustments) or "paced"
    return f"{winner.reason}; {fmt_number(value)} enforced instead: {why}"


def _horizon(behavior: Behavior) -> float:
    """How far back a behaviour looks: its memory is trimmed to this."""
    return max(
        behavior.tighten.stabilization,
        behavior.loosen.stabilization,
        behavior.tighten.period,
        behavior.loosen.period,
    )


def _clamp(policies: PolicySet, address: Address, value: float, notes: list[str]) -> float:
    spec = policies.limits.spec
    floor = spec.floors.get(address)
    ceiling = spec.ceilings.get(address)
    if floor is not None and value < floor:
        notes.append(f"raised to floor {fmt_number(floor)} (recommended {fmt_number(value)})")
        value = floor
    if ceiling is not None and value > ceiling:
        notes.append(f"lowered to ceiling {fmt_number(ceiling)} (recommended {fmt_number(value)})")
        value = ceiling
    bounds = term_range(address.limit)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        # A sharing term out of its range would shed at the gateways (as a value not ours).
        held = min(max(value, bounds[0]), bounds[1])
        notes.append(f"held within {address.limit.value}'s range {fmt_number(bounds[0])}–"
                     f"{fmt_number(bounds[1])} (recommended {fmt_number(value)})")  # fmt: skip
        value = held
    return value


def _append(
    points: tuple[tuple[float, float], ...], now: float, value: float, since: float
) -> tuple[tuple[float, float], ...]:
    """Record `value` at `now` if it changed; drop points older than `since` but the newest
    of them (the value that was in force when the window opened)."""
    if not points or points[-1][1] != value:
        points = (*points, (now, value))
    if len(points) < 2 or (len(points) == 2 and points[1][0] >= since):
        return points  # the usual case, spelled out: nothing to drop
    kept = tuple(p for p in points if p[0] >= since)
    older = [p for p in points if p[0] < since]
    return (older[-1], *kept) if older else kept


def _recommend(
    points: tuple[tuple[float, float], ...], now: float, value: float, since: float
) -> tuple[tuple[float, float], ...]:
    """Record a recommendation as (the last time it was made, value): a run of equal
    recommendations is one point, and a value counts in a window exactly when it was last
    recommended inside it. Points last made before `since` are dropped."""
    if points and points[-1][1] == value:
        points = (*points[:-1], (now, value))
    else:
        points = (*points, (now, value))
    if len(points) == 1 or (len(points) == 2 and points[0][0] >= since):
        return points  # the usual case, spelled out: nothing to drop (the last is `now`)
    return tuple(p for p in points if p[0] >= since)


def _paced(
    behavior: Behavior,
    recommended: float,
    recommendations: tuple[tuple[float, float], ...],
    previous: float | None,
    now: float,
    memory: AddressMemory,
    notes: list[str],
) -> float:
    if previous is None or recommended == previous:
        return recommended
    if recommended > previous:
        rule, loosen = behavior.loosen, True
        # Loosen only as far as every recommendation in the window allows.
        window = [v for t, v in recommendations if t >= now - rule.stabilization] or [recommended]
        value = max(previous, min(window))
    else:
        rule, loosen = behavior.tighten, False
        window = [v for t, v in recommendations if t >= now - rule.stabilization] or [recommended]
        value = min(previous, max(window))
    if value != recommended:
        notes.append(
            f"{'loosening' if loosen else 'tightening'} held by the "
            f"{format_duration(rule.stabilization)} stabilization window "
            f"(recommended {fmt_number(recommended)})"
        )
    return _rate_limited(rule, loosen, value, previous, now, memory, notes)


def _rate_limited(
    rule: BehaviorRule,
    loosen: bool,
    value: float,
    previous: float,
    now: float,
    memory: AddressMemory,
    notes: list[str],
) -> float:
    if rule.max_change_percent is None or value == previous or math.isinf(value):
        return value
    reference = _value_at(memory, now - rule.period, previous)
    if math.isinf(reference):
        # A percentage of "no limit" bounds nothing (inf × 0.5 is inf): a limit on an
        # address without baseline applies at once, as on the tick it is first set.
        return value
    step = rule.max_change_percent / 100.0
    # A percentage of 0 is 0: a limit set to 0 would never loosen, so pace it from 1.
    base = max(reference, 1.0) if loosen else reference
    bound = base * (1 + step) if loosen else reference * (1 - step)
    limited = min(value, bound) if loosen else max(value, bound)
    limited = max(limited, previous) if loosen else min(limited, previous)
    if limited != value:
        notes.append(
            f"{'loosening' if loosen else 'tightening'} limited to "
            f"{fmt_number(rule.max_change_percent)}% per {format_duration(rule.period)} "
            f"(wanted {fmt_number(value)})"
        )
    return limited


def _value_at(memory: AddressMemory, when: float, default: float) -> float:
    """The value in force at time `when` (the start of the rate-limit period)."""
    value = memory.values[0][1] if memory.values else default
    for t, v in memory.values:
        if t <= when:
            value = v
    return value
