"""When a policy may act: weekly windows like `Mon-Fri 08:00-20:00` in an IANA time zone.

Pure: parsing and a clock reading passed in as unix seconds.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from zoneinfo import ZoneInfo

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MINUTES_PER_DAY = 1440
_FORMS = (
    "accepted forms: 'Mon-Fri 08:00-20:00', 'Sat,Sun 10:00-14:00', 'daily 00:00-06:00', "
    "'Fri 22:00-02:00' (runs past midnight), 'Mon 00:00-24:00'; days are Mon..Sun, "
    "ranges may wrap (Sat-Mon)"
)
_WINDOW = re.compile(r"(?P<days>\S+)\s+(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})")


@dataclass(frozen=True)
class Window:
    """Days a window starts on, and its local start and end minute.

    `end_minute < start_minute` means the window runs past midnight into the next day; it
    belongs to the day it starts on (`Fri 22:00-02:00` covers Friday night, not Saturday's).
    """

    days: frozenset[int]  # 0=Mon..6=Sun
    start_minute: int  # 0..1439
    end_minute: int  # 1..1440
    text: str

    def __str__(self) -> str:
        return self.text

    def contains(self, weekday: int, minute: int) -> bool:
        """Whether local `weekday` (0=Mon) at `minute` after midnight falls in this window."""
        if self.start_minute < self.end_minute:
            return weekday in self.days and self.start_minute <= minute < self.end_minute
        if weekday in self.days and minute >= self.start_minute:
            return True
        return (weekday - 1) % 7 in self.days and minute < self.end_minute


def parse_window(value: object) -> Window:
    """`Mon-Fri 08:00-20:00` → Window; a Window passes through (pydantic BeforeValidator)."""
    if isinstance(value, Window):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a schedule window is text, not {type(value).__name__}: {_FORMS}")
    match = _WINDOW.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a schedule window: {_FORMS}")
    start = _minute(value, match.group("start"), allow_24=False)
    end = _minute(value, match.group("end"), allow_24=True)
    if start == end:
        raise ValueError(
            f"{value!r} starts and ends at the same time: for a whole day write 00:00-24:00; "
            f"{_FORMS}"
        )
    return Window(_days(value, match.group("days")), start, end, value.strip())


def in_windows(windows: Sequence[Window], timezone: str, now: float) -> bool:
    """Whether unix time `now` falls in any window, read on the wall clock of `timezone`."""
    local = datetime.fromtimestamp(now, ZoneInfo(timezone))
    minute = local.hour * 60 + local.minute
    return any(window.contains(local.weekday(), minute) for window in windows)


def _minute(value: str, text: str, *, allow_24: bool) -> int:
    hours, minutes = (int(part) for part in text.split(":"))
    total = hours * 60 + minutes
    if minutes > 59 or total > _MINUTES_PER_DAY or (total == _MINUTES_PER_DAY and not allow_24):
        allowed = "00:00..24:00" if allow_24 else "00:00..23:59"
        raise ValueError(f"{value!r}: {text} is not a time of day ({allowed}); {_FORMS}")
    return total


def _days(value: str, text: str) -> frozenset[int]:
    if text.lower() == "daily":
        return frozenset(range(7))
    days: set[int] = set()
    for part in text.split(","):
        first, dash, last = part.partition("-")
        start = _day(value, first)
        end = _day(value, last) if dash else start
        days.update((start + offset) % 7 for offset in range((end - start) % 7 + 1))
    return frozenset(days)


def _day(value: str, text: str) -> int:
    try:
        return DAY_NAMES.index(text.lower())
    except ValueError:
        close = difflib.get_close_matches(text.lower(), DAY_NAMES, n=1)
        hint = f" (did you mean {close[0].title()!r}?)" if close else ""
        raise ValueError(
            f"{value!r}: {text!r} is not a day{hint}; use Mon, Tue, Wed, Thu, Fri, Sat, Sun "
            f"or daily; {_FORMS}"
        ) from None
