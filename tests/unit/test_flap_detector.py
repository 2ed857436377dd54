"""The flap detector: a limit turning direction more than `threshold` times within an hour
flaps; memory per limit stays bounded however often it turns."""

from __future__ import annotations

from controller.control.telemetry import FLAP_WINDOW_SECONDS, FlapDetector
from controller.model import Address

LIMIT = Address.parse("tenant/acme/tokens_per_minute")
OTHER = Address.parse("tenant/calm/tokens_per_minute")


def zigzag(detector: FlapDetector, address: Address, moves: int, start: float) -> float:
    """`moves` changes alternating down and up, 10 s apart; the time of the last one."""
    value, now = 100.0, start
    for i in range(moves):
        new = value / 2 if i % 2 == 0 else value * 2
        detector.observe(address, value, new, now)
        value, now = new, now + 10
    return now - 10


def test_more_turns_than_the_threshold_within_an_hour_is_flapping() -> None:
    detector = FlapDetector(threshold=4)
    last = zigzag(detector, LIMIT, 6, 0.0)  # 6 moves: 5 turns
    zigzag(detector, OTHER, 5, 0.0)  # 4 turns: not more than the threshold

    assert detector.flapping(last) == {LIMIT: 5}
    assert detector.flapping(FLAP_WINDOW_SECONDS + 45.0) == {}  # the oldest turn left the hour


def test_a_limit_that_keeps_turning_keeps_threshold_plus_one_turns() -> None:
    detector = FlapDetector(threshold=4)
    last = zigzag(detector, LIMIT, 2000, 0.0)

    assert len(detector._turns[LIMIT]) == 5
    assert detector.flapping(last) == {LIMIT: 5}
    everything = FlapDetector(threshold=4, keep_all=True)
    zigzag(everything, LIMIT, 2000, 0.0)
    assert len(everything._turns[LIMIT]) == 1999
