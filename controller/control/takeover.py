"""What a replica carries over when it becomes leader: the resolver's memory, continued
from what the sink enforces."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from controller.model import Address
from controller.policy.resolver import ResolverState


def reseeded(
    previous: ResolverState, enforced: Mapping[Address, float], now: float
) -> ResolverState:
    """The resolver state of a replica that becomes leader: what the sink holds, continued
    from this replica's own memory (it resolved every tick while following) where that
    memory ends at the value enforced, so stabilization windows and the behaviour of the
    policy that won carry on instead of starting over from the Limits default."""
    seeded = ResolverState.seeded(enforced, now)
    memory = dict(seeded.memory)
    for address, fresh in seeded.memory.items():
        known = previous.memory.get(address)
        if known is None:
            continue
        if known.last == fresh.last:
            memory[address] = known
        else:  # another leader moved it: its value, but the same policy's behaviour
            memory[address] = replace(fresh, policy=known.policy)
    return ResolverState(memory)
