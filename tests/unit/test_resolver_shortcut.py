"""The resolver's short way for a limit whose winning proposal is the value in force gives
exactly the decision and memory of the full way, whatever the history."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from controller.model import Address, Decision, Proposal
from controller.policy.baselines import Baselines
from controller.policy.resolver import (
    AddressMemory,
    ResolverState,
    _explicit,
    _resolve_one,
    _settled,
    _Shared,
    resolve,
)
from tests.unit.policy_builders import addr, policy_set, proposal

STEPPED = {
    "tighten": {"stabilization": "20s", "max_change_percent": 50, "period": "60s"},
    "loosen": {"stabilization": "40s", "max_change_percent": 10, "period": "60s"},
}
TENANTS = [addr(f"tenant/t{i}/tokens_per_minute") for i in range(4)]
POLICIES = ("ThrottlePolicy/a", "ThrottlePolicy/b")
# Per tick and tenant: nothing, or one or two (policy, value) proposals from a few values.
OFFERS = st.lists(
    st.lists(
        st.lists(
            st.tuples(st.sampled_from(POLICIES), st.sampled_from([100.0, 500.0, 900.0, 1000.0])),
            max_size=2,
        ),
        min_size=len(TENANTS),
        max_size=len(TENANTS),
    ),
    min_size=1,
    max_size=25,
)


def _facts(decision: Decision | None) -> tuple[Any, ...] | None:
    if decision is None:
        return None
    return (
        decision.value,
        decision.source,
        decision.policy,
        decision.reason,
        decision.signals,
        decision.proposals,
        decision.baseline,
        decision.adjustments,
    )


@settings(max_examples=150, deadline=None)
@given(OFFERS, st.sampled_from([None, STEPPED]))
def test_the_short_way_resolves_as_the_full_way(offers: Any, behavior: Any) -> None:
    policies = policy_set(**({} if behavior is None else {"behavior": behavior}))
    baselines = Baselines(policies, {})
    state, reference = ResolverState(), ResolverState()
    for tick, per_tenant in enumerate(offers):
        now = 15.0 * tick
        made = [
            proposal(str(address), value, policy)
            for address, wanted in zip(TENANTS, per_tenant, strict=True)
            for policy, value in wanted
        ]
        result = resolve(policies, baselines, made, {}, state, now)
        memory: dict[Address, AddressMemory] = {}
        for address in TENANTS:
            mine: list[Proposal] = [p for p in made if p.address == address]
            decision, remembered = _resolve_one(
                policies,
                address,
                baselines.value(address),
                mine,
                None,
                reference.memory.get(address, AddressMemory()),
                now,
                False,
                _Shared(policies, now),
            )
            baseline = baselines.value(address)
            if remembered.values and not _settled(remembered, baseline, address):
                memory[address] = remembered
            if decision is not None and not _explicit(decision, address):
                decision = None
            assert _facts(result.desired.get(address)) == _facts(decision), (tick, address)
            assert result.state.memory.get(address) == memory.get(address), (tick, address)
        state, reference = result.state, ResolverState(memory)
