"""controller/gateway/waits.py: the pauses between lookups of a record not there yet, and the
bounds on how many lookups wait at once (in all, and per tenant)."""

from __future__ import annotations

import pytest

from controller.gateway.waits import RecordWaits, pauses, tenant_share


def test_the_default_wait_asks_six_more_times_over_half_a_second() -> None:
    assert pauses(0.5) == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.19])
    assert sum(pauses(2.0)) == pytest.approx(2.0)
    assert len(pauses(2.0)) == 8  # the most any setting asks
    assert pauses(0) == []
    assert pauses(0.005) == pytest.approx([0.005])


@pytest.mark.parametrize(("waiters", "share"), [(0, 0), (1, 1), (3, 1), (4, 1), (64, 16)])
def test_a_tenant_may_hold_a_quarter_of_the_waits(waiters: int, share: int) -> None:
    assert tenant_share(waiters) == share


def test_a_wait_past_either_bound_is_not_granted_and_a_slot_comes_back() -> None:
    waits = RecordWaits(0.5, 4)  # one per tenant
    with waits.slot("a") as first, waits.slot("a") as second:
        assert (first, second) == (True, False)  # a's share is held
        with waits.slot("b") as b, waits.slot("c") as c, waits.slot("d") as d:
            assert (b, c, d) == (True, True, True)
            with waits.slot("e") as e:
                assert not e  # 4 in all: none left
        assert (waits.total, waits.waiting) == (1, {"a": 1})
    assert (waits.total, waits.waiting) == (0, {})


def test_a_slot_is_given_back_when_the_wait_fails() -> None:
    waits = RecordWaits(0.5, 4)

    def lookup_fails() -> None:
        with waits.slot("a") as granted:
            assert granted
            raise ConnectionError

    with pytest.raises(ConnectionError):
        lookup_fails()
    assert (waits.total, waits.waiting) == (0, {})


def test_no_wait_set_grants_none() -> None:
    with RecordWaits(0.0, 64).slot("a") as granted:
        assert not granted
