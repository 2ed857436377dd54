"""Reasons written when read: a proposal's `head (readings)tail`, a decision's from its winner."""

from __future__ import annotations

import math

from controller.model import Address, Decision, Proposal, SignalReading, Source

ADDRESS = Address.parse("tenant/acme/tokens_per_minute")
LOAD = SignalReading("load", 0.95, 1.0)
QUEUE = SignalReading("queue", math.nan, 1.0)


def test_a_given_reason_is_kept_as_is() -> None:
    proposal = Proposal(ADDRESS, 5.0, "ThrottlePolicy/hot", "gpu hot", (LOAD,))
    assert proposal.reason == "gpu hot"


def test_a_reason_with_a_tail_quotes_the_readings() -> None:
    proposal = Proposal(
        ADDRESS, 5.0, "ThrottlePolicy/hot", "`load > 0.9` held", (LOAD, QUEUE), tail="; set 5"
    )
    assert proposal.reason == "`load > 0.9` held (load=0.95, queue=n/a); set 5"
    assert "load=0.95" in repr(proposal)
    bare = Proposal(ADDRESS, 5.0, "ThrottlePolicy/hot", "scheduled held", tail="; set 5")
    assert bare.reason == "scheduled held; set 5"


def test_a_decision_reads_its_reason_from_the_winning_proposal() -> None:
    winner = Proposal(ADDRESS, 5.0, "ThrottlePolicy/hot", "held", (LOAD,), tail="; set 5")
    decision = Decision(ADDRESS, 5.0, Source.POLICY, winner.policy, winner, (LOAD,), (winner,))
    assert decision.reason == "held (load=0.95); set 5"
    assert Decision(ADDRESS, 9.0, Source.BASELINE, None, "baseline").reason == "baseline"


class _Column:
    """Quotes for one label value at a time, counting how often it is asked."""

    def __init__(self) -> None:
        self.asked = 0

    def readings(self, at: int) -> tuple[SignalReading, ...]:
        self.asked += 1
        return (SignalReading("load", 0.5 + at, 1.0),)


def test_readings_held_as_quotes_are_read_only_when_asked_for() -> None:
    column = _Column()
    quoted = Proposal(ADDRESS, 5.0, "ThrottlePolicy/hot", "held", column, tail="; set 5", at=1)
    assert column.asked == 0
    assert quoted.signals == (SignalReading("load", 1.5, 1.0),)
    assert quoted.reason == "held (load=1.5); set 5"
    plain = Proposal(
        ADDRESS,
        5.0,
        "ThrottlePolicy/hot",
        "held",
        (SignalReading("load", 1.5, 1.0),),
        tail="; set 5",
    )
    assert quoted == plain
    assert hash(quoted) == hash(plain)
    decision = Decision(ADDRESS, 5.0, Source.POLICY, quoted.policy, quoted, quoted, (quoted,))
    assert decision.signals == plain.signals


def test_a_proposal_quoting_an_untrustworthy_reading_equals_itself() -> None:
    proposal = Proposal(ADDRESS, 5.0, "ThrottlePolicy/hot", "held", (QUEUE,), tail="; set 5")
    assert proposal == proposal
