"""Schedule windows: parsing, days and times, past midnight, time zones and DST."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel, BeforeValidator, ValidationError

from controller.policy.schedule import Window, in_windows, parse_window

BERLIN = "Europe/Berlin"


def at(text: str, zone: str = BERLIN) -> float:
    """Unix seconds of a local wall-clock time, `2026-03-27 21:00`."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(zone)).timestamp()


@pytest.mark.parametrize(
    ("text", "days", "start", "end"),
    [
        ("Mon-Fri 08:00-20:00", {0, 1, 2, 3, 4}, 480, 1200),
        ("Sat,Sun 10:00-14:00", {5, 6}, 600, 840),
        ("daily 00:00-06:00", set(range(7)), 0, 360),
        ("Fri 22:00-02:00", {4}, 1320, 120),
        ("Mon 00:00-24:00", {0}, 0, 1440),
        ("sat-mon 9:30-10:00", {5, 6, 0}, 570, 600),
        ("SUN-TUE,Thu 23:59-24:00", {6, 0, 1, 3}, 1439, 1440),
        ("  Wed  07:00 - 08:15 ", {2}, 420, 495),
        ("DAILY 12:00-13:00", set(range(7)), 720, 780),
    ],
)
def test_parse_window(text: str, days: set[int], start: int, end: int) -> None:
    window = parse_window(text)
    assert window.days == frozenset(days)
    assert (window.start_minute, window.end_minute) == (start, end)
    assert str(window) == text.strip()


def test_a_built_window_passes_through() -> None:
    window = parse_window("Mon 08:00-09:00")
    assert parse_window(window) is window


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("Mon-Fri", "is not a schedule window"),
        ("08:00-20:00", "is not a schedule window"),
        ("Mon-Fri 8-20", "is not a schedule window"),
        ("Mo-Fr 08:00-20:00", "'Mo' is not a day (did you mean 'Mon'?)"),
        ("Mon-Fry 08:00-20:00", "'Fry' is not a day (did you mean 'Fri'?)"),
        ("Mon- 08:00-20:00", "'' is not a day"),
        ("Mon,,Tue 08:00-20:00", "'' is not a day"),
        ("Mon 24:00-02:00", "24:00 is not a time of day (00:00..23:59)"),
        ("Mon 08:00-24:01", "24:01 is not a time of day (00:00..24:00)"),
        ("Mon 08:60-09:00", "08:60 is not a time of day"),
        ("Mon 08:00-08:00", "for a whole day write 00:00-24:00"),
        (42, "a schedule window is text, not int"),
        (None, "a schedule window is text, not NoneType"),
    ],
)
def test_parse_errors_show_the_accepted_forms(value: object, fragment: str) -> None:
    with pytest.raises(ValueError, match="accepted forms: 'Mon-Fri 08:00-20:00'") as caught:
        parse_window(value)
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    ("local", "inside"),
    [
        ("2026-03-23 07:59", False),  # Monday, before the window
        ("2026-03-23 08:00", True),  # start is inclusive
        ("2026-03-27 19:59", True),  # Friday
        ("2026-03-27 20:00", False),  # end is exclusive
        ("2026-03-28 12:00", False),  # Saturday
    ],
)
def test_weekday_window(local: str, inside: bool) -> None:
    window = parse_window("Mon-Fri 08:00-20:00")
    assert in_windows([window], BERLIN, at(local)) is inside


@pytest.mark.parametrize(
    ("local", "inside"),
    [
        ("2026-03-27 21:59", False),  # Friday before the start
        ("2026-03-27 23:00", True),  # Friday night
        ("2026-03-28 01:00", True),  # Saturday early: still Friday's window
        ("2026-03-28 02:00", False),  # end is exclusive
        ("2026-03-28 23:00", False),  # Saturday night is not Friday
        ("2026-03-29 01:00", False),  # Sunday early: Saturday had no window
        ("2026-03-26 01:00", False),  # Thursday early: Wednesday had no window
    ],
)
def test_window_past_midnight_belongs_to_its_start_day(local: str, inside: bool) -> None:
    window = parse_window("Fri 22:00-02:00")
    assert in_windows([window], BERLIN, at(local)) is inside


def test_past_midnight_wraps_from_sunday_to_monday() -> None:
    window = parse_window("Sun 23:00-01:00")
    assert in_windows([window], BERLIN, at("2026-03-30 00:30"))  # Monday early
    assert not in_windows([window], BERLIN, at("2026-03-31 00:30"))  # Tuesday early


def test_whole_day_and_wrapping_day_range() -> None:
    whole = parse_window("Mon 00:00-24:00")
    assert in_windows([whole], BERLIN, at("2026-03-23 00:00"))
    assert in_windows([whole], BERLIN, at("2026-03-23 23:59"))
    assert not in_windows([whole], BERLIN, at("2026-03-24 00:00"))
    weekend = parse_window("Sat-Mon 10:00-11:00")
    inside = [in_windows([weekend], BERLIN, at(f"2026-03-{d} 10:30")) for d in range(23, 30)]
    assert inside == [True, False, False, False, False, True, True]  # Mon .. Sun


def test_any_of_several_windows() -> None:
    windows = [parse_window("Mon 08:00-09:00"), parse_window("Tue 08:00-09:00")]
    assert in_windows(windows, BERLIN, at("2026-03-24 08:30"))
    assert not in_windows(windows, BERLIN, at("2026-03-25 08:30"))
    assert not in_windows([], BERLIN, at("2026-03-25 08:30"))


def test_time_zone_is_the_wall_clock_of_the_policy() -> None:
    window = parse_window("daily 08:00-09:00")
    instant = at("2026-06-15 08:30")  # 08:30 in Berlin (CEST) is 06:30 UTC
    assert in_windows([window], BERLIN, instant)
    assert not in_windows([window], "UTC", instant)
    assert in_windows([window], "UTC", at("2026-06-15 08:30", "UTC"))


def test_dst_spring_forward_in_berlin() -> None:
    # 2026-03-29: clocks jump from 02:00 CET to 03:00 CEST, so 01:00-04:00 lasts two real hours.
    window = parse_window("daily 01:00-04:00")
    march_29_0100 = at("2026-03-29 01:00")
    assert in_windows([window], BERLIN, march_29_0100)
    assert in_windows([window], BERLIN, march_29_0100 + 3599)  # 01:59:59 CET
    assert in_windows([window], BERLIN, march_29_0100 + 3600)  # 03:00 CEST
    assert in_windows([window], BERLIN, march_29_0100 + 7199)  # 03:59:59 CEST
    assert not in_windows([window], BERLIN, march_29_0100 + 7200)  # 04:00 CEST
    # The same local window moves by an hour in UTC across the change.
    morning = parse_window("daily 07:00-08:00")
    assert in_windows([morning], BERLIN, at("2026-03-28 06:30", "UTC"))  # 07:30 CET
    assert not in_windows([morning], BERLIN, at("2026-03-29 06:30", "UTC"))  # 08:30 CEST
    assert in_windows([morning], BERLIN, at("2026-03-29 05:30", "UTC"))  # 07:30 CEST


def test_dst_fall_back_in_berlin() -> None:
    # 2026-10-25: clocks go back from 03:00 CEST to 02:00 CET; 02:30 happens twice and both
    # are inside a 02:00-03:00 window, which therefore lasts two real hours.
    window = parse_window("Sun 02:00-03:00")
    first = datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo(BERLIN), fold=0).timestamp()
    second = datetime(2026, 10, 25, 2, 30, tzinfo=ZoneInfo(BERLIN), fold=1).timestamp()
    assert second - first == 3600
    assert in_windows([window], BERLIN, first)
    assert in_windows([window], BERLIN, second)
    assert not in_windows([window], BERLIN, second + 1800)  # 03:00 CET


def test_window_as_pydantic_field() -> None:
    class Schedule(BaseModel):
        windows: list[Annotated[Window, BeforeValidator(parse_window)]]

    built = parse_window("Sat,Sun 10:00-14:00")
    schedule = Schedule(windows=["Mon-Fri 08:00-20:00", built])
    assert schedule.windows[1] is built
    assert schedule.windows[0].days == frozenset(range(5))
    with pytest.raises(ValidationError, match="accepted forms"):
        Schedule(windows=["weekdays 08:00-20:00"])
