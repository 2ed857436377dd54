"""Retry-After's back-off runs on a monotonic clock: the wall clock stepped back (NTP) during
a back-off must not stretch it past what the server asked, nor past the five-minute cap."""

from __future__ import annotations

from controller.clients.backoff import RETRY_AFTER_MAX_SECONDS, Backoff

WALL = 1_800_000_000.0  # some wall-clock second


class Ticks:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_wall_clock_stepped_back_does_not_stretch_the_back_off() -> None:
    ticks = Ticks()
    backoff = Backoff(clock=ticks)
    held = backoff.hold(429, "10", WALL, "Prometheus at http://p")
    assert held is not None
    assert held.until == WALL + 10
    assert backoff.waiting() == (
        "not asked until 08:00:10Z: Prometheus at http://p answered HTTP 429 with Retry-After: 10"
    )
    # Only the monotonic clock decides (the wall clock is never read again): 10 s after, over.
    ticks.now += 9.9
    assert backoff.waiting() is not None
    ticks.now += 0.1
    assert backoff.waiting() is None


def test_an_http_date_is_read_on_the_wall_clock_and_capped() -> None:
    ticks = Ticks()
    backoff = Backoff(clock=ticks)
    held = backoff.hold(503, "Fri, 15 Jan 2027 08:00:00 GMT", WALL - 86_400.0, "P")
    assert held is not None
    assert held.seconds == RETRY_AFTER_MAX_SECONDS
    assert held.asked is not None
    assert held.asked > RETRY_AFTER_MAX_SECONDS
    ticks.now += RETRY_AFTER_MAX_SECONDS
    assert backoff.waiting() is None
