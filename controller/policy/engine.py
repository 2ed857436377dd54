"""The policy engine: signal snapshot + last state + now → proposals with reasons + next state.

Pure and deterministic: no I/O, no clock reads (time is an argument), no randomness. The
same inputs always give the same proposals, which is what makes policy tests possible.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import numpy as np

from controller.durations import format_duration
from controller.model import (
    Address,
    AddressError,
    Proposal,
    Quotes,
    Sample,
    SignalReading,
    Snapshot,
    VectorSample,
)
from controller.policy.adaptive import AdaptiveState, evaluate_adaptive
from controller.policy.baselines import Baselines
from controller.policy.conditions import IDLE, ConditionState, Event, Rules, recovered, step
from controller.policy.documents import Action, ThrottlePolicy
from controller.policy.expressions import Bools
from controller.policy.fairshare import evaluate_fair
from controller.policy.inputs import (
    BoolArray,
    ScalarInput,
    VectorInput,
    env_of,
    label_universe,
    scalar_input,
    vector_input,
)
from controller.policy.policyset import PolicySet
from controller.policy.schedule import in_windows
from controller.policy.targets import fill, filled
from controller.policy.text import fmt_number, fmt_time

SCALAR_KEY = ""  # the state key of a policy without `per:`


@dataclass(frozen=True)
class EngineState:
    """Everything the engine remembers between ticks. Sparse: idle conditions are not kept."""

    conditions: Mapping[str, Mapping[str, ConditionState]] = field(default_factory=dict)
    adaptives: Mapping[str, AdaptiveState] = field(default_factory=dict)
    fair: frozenset[str] = frozenset()  # the FairShare policies engaged (under contention)


@dataclass(frozen=True, slots=True)
class Transition:
    """A condition that engaged or released this tick (journal material)."""

    policy: str
    key: str  # the label value for `per:` policies, "" otherwise
    event: Event
    signals: tuple[SignalReading, ...]
    detail: str = ""  # why, in words, when the event alone does not say it (journalled)


@dataclass(frozen=True)
class Evaluation:
    """The engine's output for one tick."""

    proposals: tuple[Proposal, ...]
    state: EngineState
    transitions: tuple[Transition, ...] = ()
    notes: tuple[str, ...] = ()  # things an operator should know (a skipped action, a bad label)
    active: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # policy → active keys
    # Active (policy, label value) pairs none of whose actions gave a limit, with why: the
    # policy says it acts while nothing is enforced (the loop logs and counts them).
    unwritten: Mapping[tuple[str, str], str] = field(default_factory=dict)


def evaluate(
    policies: PolicySet,
    snapshot: Snapshot,
    state: EngineState,
    now: float,
    baselines: Baselines,
    current: Mapping[Address, float] | None = None,
) -> Evaluation:
    """Evaluate every policy once. `current` holds the limits in force (for AdaptiveLimit)."""
    out = _Collector()
    conditions: dict[str, Mapping[str, ConditionState]] = {}
    for policy in policies.throttles:
        previous = state.conditions.get(policy.ref, {})
        if policy.spec.per is None:
            conditions[policy.ref] = _scalar_policy(policy, snapshot, previous, now, baselines, out)
        else:
            conditions[policy.ref] = _per_label_policy(
                policy, snapshot, previous, now, baselines, out
            )
    adaptives: dict[str, AdaptiveState] = {}
    for adaptive in policies.adaptives:
        result = evaluate_adaptive(
            adaptive,
            snapshot,
            state.adaptives.get(adaptive.ref, AdaptiveState()),
            now,
            baselines,
            (current or {}).get(adaptive.spec.target),
        )
        adaptives[adaptive.ref] = result.state
        if result.proposal is not None:
            out.proposals.append(result.proposal)
            out.active.setdefault(adaptive.ref, []).append("")
        out.notes.extend(result.notes)
        if result.event:
            out.transitions.append(
                Transition(adaptive.ref, SCALAR_KEY, result.event, result.readings, result.why)
            )
    return Evaluation(
        proposals=tuple(out.proposals),
        state=EngineState(
            conditions={k: v for k, v in conditions.items() if v},
            adaptives=adaptives,
            fair=state.fair,
        ),
        transitions=tuple(out.transitions),
        notes=tuple(out.notes),
        active={k: tuple(v) for k, v in out.active.items()},
        unwritten=out.unwritten,
    )


def share(
    policies: PolicySet,
    evaluation: Evaluation,
    snapshot: Snapshot,
    now: float,
    baselines: Baselines,
    levels: Mapping[Address, float],
    in_force: Mapping[Address, float],
) -> Evaluation:
    """Add every FairShare's proposals to `evaluation`: each splits the value its level
    takes on this tick (`levels`, from the resolver: after the AdaptiveLimit that moves it);
    `in_force`: the limits in force before this tick (a share close to its tenant's holds)."""
    proposals, notes = list(evaluation.proposals), list(evaluation.notes)
    transitions, active = list(evaluation.transitions), dict(evaluation.active)
    engaged: set[str] = set()
    for policy in policies.fair_shares:
        level = levels.get(policy.spec.level)
        result = evaluate_fair(policy, snapshot, now, baselines, level, in_force)
        proposals.extend(result.proposals)
        notes.extend(result.notes)
        was = policy.ref in evaluation.state.fair
        if result.engaged:
            engaged.add(policy.ref)
            active[policy.ref] = result.held
        if result.engaged != was:
            event: Event = "engaged" if result.engaged else "released"
            transitions.append(Transition(policy.ref, SCALAR_KEY, event, result.readings))
    return replace(
        evaluation,
        proposals=tuple(proposals),
        notes=tuple(notes),
        transitions=tuple(transitions),
        active=active,
        state=replace(evaluation.state, fair=frozenset(engaged)),
    )


class _Collector:
    def __init__(self) -> None:
        self.proposals: list[Proposal] = []
        self.transitions: list[Transition] = []
        self.notes: list[str] = []
        self.active: dict[str, list[str]] = {}
        self.unwritten: dict[tuple[str, str], str] = {}


def _rules(policy: ThrottlePolicy) -> Rules:
    return Rules(
        hold=policy.spec.for_, cooldown=policy.spec.cooldown, on_stale=policy.spec.on_stale
    )


def _scheduled(policy: ThrottlePolicy, now: float) -> bool:
    schedule = policy.spec.schedule
    return schedule is None or in_windows(schedule.windows, schedule.timezone, now)


def _keep(state: ConditionState, now: float, policy: ThrottlePolicy) -> bool:
    """Whether a condition state still carries information worth a slot in memory."""
    if state.active_since is not None or state.pending_since is not None:
        return True
    # An idle condition's untrustworthy-since time only matters to `then: min` (it engages
    # after hold_for); kept otherwise, every tenant that ever vanished would stay forever.
    if state.invalid_since is not None and policy.spec.on_stale.then == "min":
        return True
    return state.released_at is not None and now - state.released_at < policy.spec.cooldown


def _scalar_policy(
    policy: ThrottlePolicy,
    snapshot: Snapshot,
    previous: Mapping[str, ConditionState],
    now: float,
    baselines: Baselines,
    out: _Collector,
) -> Mapping[str, ConditionState]:
    state = previous.get(SCALAR_KEY, ConditionState())
    if not _scheduled(policy, now):
        if state.active:
            out.transitions.append(Transition(policy.ref, SCALAR_KEY, "released", ()))
            state = ConditionState(released_at=now)
        return {SCALAR_KEY: state} if _keep(state, now, policy) else {}
    inputs = [
        scalar_input(name, spec, snapshot, None, now) for name, spec in policy.spec.signals.items()
    ]
    values = {i.name: i.value for i in inputs}
    when_expr, until_expr = policy.spec.when_expression, policy.spec.until_expression
    # An active policy needs trustworthy release signals, an idle one engage signals.
    used = policy.spec.release_names if state.active else policy.spec.engage_names
    valid = all(i.valid for i in inputs if i.name in used)
    when = valid and (when_expr is None or when_expr.evaluate_one(values))
    until = until_expr.evaluate_one(values) if (valid and until_expr and state.active) else None
    readings = tuple(i.reading() for i in inputs)
    before = state
    state, event = step(state, valid=valid, when=when, until=until, now=now, rules=_rules(policy))
    if _hold_ended(before, state):
        out.transitions.append(_recovered(policy, SCALAR_KEY, before, now, readings))
    if event:
        out.transitions.append(Transition(policy.ref, SCALAR_KEY, event, readings))
    if state.active:
        out.active.setdefault(policy.ref, []).append(SCALAR_KEY)
        _Proposer(policy, baselines, out).propose(
            None, SCALAR_KEY, state, readings, _stale_note(inputs)
        )
    return {SCALAR_KEY: state} if _keep(state, now, policy) else {}


def _hold_ended(before: ConditionState, after: ConditionState) -> bool:
    """Whether an active condition held (or engaged by `then: min`) on bad signals has
    usable ones again. An idle condition's bad signals held nothing: no stale-hold began."""
    return before.active and before.invalid_since is not None and after.invalid_since is None


def _recovered(
    policy: ThrottlePolicy,
    key: str,
    before: ConditionState,
    now: float,
    readings: tuple[SignalReading, ...],
) -> Transition:
    """A hold's end, journalled as an AdaptiveLimit's is: the signals it decides on again."""
    assert before.invalid_since is not None  # _hold_ended
    names = ", ".join(sorted(policy.spec.release_names))
    why = recovered(names, before.invalid_since, now, "the condition decides again")
    return Transition(policy.ref, key, "stale-recovered", readings, why)


def _stale_note(inputs: list[ScalarInput]) -> str:
    bad = [f"{i.name} {i.validity.value}" for i in inputs if not i.valid]
    return f" (signals untrustworthy: {', '.join(bad)})" if bad else ""


def _per_label_policy(
    policy: ThrottlePolicy,
    snapshot: Snapshot,
    previous: Mapping[str, ConditionState],
    now: float,
    baselines: Baselines,
    out: _Collector,
) -> Mapping[str, ConditionState]:
    label = str(policy.spec.per)
    if not _scheduled(policy, now):
        _release_all(policy, previous, out)
        return {}
    keys = {name: spec.key(label) for name, spec in policy.spec.signals.items()}
    samples = {name: snapshot.samples.get(key) for name, key in keys.items()}
    universe = label_universe(list(samples.values()), [k for k in previous if k])
    inputs = {
        name: vector_input(name, spec, samples[name], universe, now)
        for name, spec in policy.spec.signals.items()
    }
    when_expr, until_expr = policy.spec.when_expression, policy.spec.until_expression
    size = len(universe)
    # An active label value needs trustworthy release signals, an idle one engage signals.
    valid_engage = _all_valid(inputs, policy.spec.engage_names, size)
    valid_release = _all_valid(inputs, policy.spec.release_names, size)
    env = env_of(inputs)
    when = valid_engage & (
        when_expr.evaluate(env, size) if when_expr else np.ones(size, dtype=bool)
    )
    until = until_expr.evaluate(env, size) if until_expr and previous else None
    # Only label values that fire now, or that the engine already tracks, need a state step.
    # So `on_stale.then: min` engages only label values that were pending or active when their
    # data went missing: a tenant never seen with valid data (a new one) is never flagged.
    # A mask, not a set of positions: 100k ints in a set, then sorted, every tick otherwise.
    candidates = _candidates(when, previous, universe, samples.values())
    rules = _rules(policy)
    proposer = _Proposer(policy, baselines, out)
    # The readings are quoted only when read (a transition's, a changed limit's reason):
    # built here for every active label value, they were a fifth of a tick's memory.
    quotes = _Quotes(tuple(inputs.values()))
    # Plain lists: a per-label-value loop reads them far faster than numpy scalars.
    engage, release, fires = valid_engage.tolist(), valid_release.tolist(), when.tolist()
    releases = until.tolist() if until is not None else None
    states: dict[str, ConditionState] = {}
    # The states that changed this tick, equal ones made once: the label values that engaged
    # (or went pending, or released) together share one (as few objects as possible survive
    # a tick, scattered among its short-lived ones: they keep its peak's memory allocated).
    made: dict[ConditionState, ConditionState] = {}
    ref, transitions = policy.ref, out.transitions
    active: list[str] | None = None
    for i in np.flatnonzero(candidates).tolist():
        key = universe[i]
        state = before = previous.get(key, IDLE)
        event: Event
        if (
            state.active_since is not None
            and state.invalid_since is None
            and release[i]
            and not (releases[i] if releases is not None else not fires[i])
        ):
            event = ""  # active and staying so, on trustworthy signals: `step`'s answer, inline
        else:
            state, event = step(
                state,
                valid=release[i] if state.active else engage[i],
                when=fires[i],
                until=releases[i] if releases is not None else None,
                now=now,
                rules=rules,
            )
            if _hold_ended(before, state):
                transitions.append(_recovered(policy, key, before, now, quotes.readings(i)))
        if event:
            transitions.append(Transition(ref, key, event, quotes.readings(i)))
        if state.active:
            if active is None:
                active = out.active.setdefault(ref, [])
            active.append(key)
            proposer.propose(label, key, state, quotes, "", i)
        if _keep(state, now, policy):
            states[key] = state if state is before else made.setdefault(state, state)
    return states


def _release_all(
    policy: ThrottlePolicy, previous: Mapping[str, ConditionState], out: _Collector
) -> None:
    """Outside its schedule a per-label policy releases every active label value."""
    for key, state in previous.items():
        if state.active:
            out.transitions.append(Transition(policy.ref, key, "released", ()))


def _candidates(
    when: Bools,
    previous: Mapping[str, ConditionState],
    universe: tuple[str, ...],
    samples: Iterable[Sample | None],
) -> Bools:
    """The label values that fire now or that the engine already tracks, as a mask."""
    candidates = when.copy()
    if previous:
        position = _positions(universe, samples)
        tracked = [position[k] for k in previous if k in position]
        candidates[np.array(tracked, dtype=np.int64)] = True
    return candidates


def _positions(universe: tuple[str, ...], samples: Iterable[Sample | None]) -> Mapping[str, int]:
    """Label value → its position in `universe`: a sample's own index when the universe is
    its keys (`label_universe` checked they are distinct), else built."""
    for sample in samples:
        if isinstance(sample, VectorSample) and sample.keys is universe:
            return sample.index()
    return {k: i for i, k in enumerate(universe)}


class _Quotes:
    """One per-label policy's signals this tick, quoted per label value when read. A label
    value read is read several times (its transition, its limit's journal event and decision
    record): quoted once."""

    __slots__ = ("_quoted", "inputs")

    def __init__(self, inputs: tuple[VectorInput, ...]) -> None:
        self.inputs = inputs
        self._quoted: dict[int, tuple[SignalReading, ...]] = {}

    def readings(self, at: int) -> tuple[SignalReading, ...]:
        found = self._quoted.get(at)
        if found is None:
            found = self._quoted[at] = tuple([signal.reading(at) for signal in self.inputs])
        return found


def _all_valid(inputs: Mapping[str, VectorInput], names: frozenset[str], size: int) -> BoolArray:
    valid = np.ones(size, dtype=bool)
    for name in names:
        valid &= inputs[name].valid
    return valid


class _Proposer:
    """Turns one policy's active conditions into proposals. The parts of a reason that many
    label values share (the condition, the activation time, the action on a baseline) are
    formatted once per tick, and each label value's address is parsed once per process."""

    def __init__(self, policy: ThrottlePolicy, baselines: Baselines, out: _Collector) -> None:
        self.policy, self.baselines, self.out = policy, baselines, out
        self.ref = policy.ref
        spec = policy.spec
        condition = f"`{spec.when}`" if spec.when else "scheduled"
        held = f" held for {format_duration(spec.for_)}" if spec.for_ else " held"
        self._head = condition + held
        label = spec.per and str(spec.per)
        # Each action's addresses per label value, shared by every tick's proposer.
        self._filled = [filled(a.target, label) for a in spec.actions]
        self._since: dict[float | None, str] = {}
        self._actions: dict[tuple[int, float | None], tuple[float | None, str]] = {}
        self._tails: dict[tuple[str, str], str] = {}

    def propose(
        self,
        label: str | None,
        key: str,
        state: ConditionState,
        readings: tuple[SignalReading, ...] | Quotes,
        suffix: str,
        at: int = 0,
    ) -> None:
        since = self._since.get(state.active_since)
        if since is None:
            since = self._head + (
                f", active since {fmt_time(state.active_since)}"
                if state.active_since is not None
                else ""
            )
            self._since[state.active_since] = since
        ref = self.ref
        missed: list[str] = []
        for index, action in enumerate(self.policy.spec.actions):
            known = self._filled[index]
            try:
                address = known.get(key) or fill(known, action.target, label, key)
            except AddressError as exc:
                missed.append(f"label value cannot form an address: {exc.problem}")
                continue
            value, how = self._value(index, action, address)
            if value is None:
                missed.append(how)
                continue
            # The reason, `since (readings)suffix; how`, is written when read (few are).
            tail = self._tails.get((suffix, how))
            if tail is None:
                tail = self._tails[suffix, how] = f"{suffix}; {how}"
            self.out.proposals.append(
                Proposal(address, value, ref, since, readings, tail=tail, at=at)
            )
        self._missed(key, missed)

    def _missed(self, key: str, missed: list[str]) -> None:
        """Note the actions that gave no limit; all of them: an engagement writing nothing."""
        self.out.notes.extend(f"{self.ref}: {why}" for why in missed)
        if missed and len(missed) == len(self.policy.spec.actions):
            self.out.unwritten[self.ref, key] = "; ".join(dict.fromkeys(missed))

    def _value(self, index: int, action: Action, address: Address) -> tuple[float | None, str]:
        """`_action_value`, once per action and baseline value (most label values share one)."""
        if action.set is not None:
            return _action_value(action, address, self.baselines)
        base = self.baselines.value(address)
        found = self._actions.get((index, base))
        if found is None:
            found = self._actions[index, base] = _action_value(action, address, self.baselines)
        return found


def _action_value(
    action: Action, address: Address, baselines: Baselines
) -> tuple[float | None, str]:
    if action.set is not None:
        value, how = action.set, f"set {fmt_number(action.set)}"
    else:
        base = baselines.value(address)
        if base is None:
            return None, f"cannot scale {address}: it has no baseline (use `set:` or add a limit)"
        value, how = (
            base * float(action.scale or 1.0),
            f"scale {fmt_number(action.scale)} × baseline {fmt_number(base)}",
        )
    if action.min is not None and value < action.min:
        value, how = action.min, f"{how}, raised to min {fmt_number(action.min)}"
    if action.max is not None and value > action.max:
        value, how = action.max, f"{how}, lowered to max {fmt_number(action.max)}"
    return value, how
