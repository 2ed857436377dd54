"""Retry-After on HTTP 429 and 503: a server's own word on when to ask it again, kept so
that nothing is asked of it before then."""

from __future__ import annotations

import datetime as dt
import email.utils
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The statuses whose Retry-After says when the server will answer again (RFC 9110 §10.2.3;
# a 3xx's is about the redirect and is not followed anyway).
RETRY_STATUSES = frozenset({429, 503})
# A proxy misconfigured to say a day would keep every policy on its fallback for a day; five
# minutes is past any load-shedding window and within a hold_for an operator would choose.
RETRY_AFTER_MAX_SECONDS = 300.0


class MalformedRetryAfterError(ValueError):
    """A Retry-After that is neither whole seconds nor an HTTP-date."""


def retry_after_seconds(value: str, now: float) -> float:
    """The delay a Retry-After value names from `now` (wall-clock seconds): whole seconds or
    an HTTP-date (a date in the past: 0). Raises MalformedRetryAfterError otherwise."""
    text = value.strip()
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError) as exc:
        raise MalformedRetryAfterError(
            f"Retry-After {text[:64]!r} is neither whole seconds nor an HTTP-date"
        ) from exc
    if when.tzinfo is None:  # "-0000": an HTTP-date is GMT whatever it writes
        when = when.replace(tzinfo=dt.UTC)
    return max(when.timestamp() - now, 0.0)


@dataclass(frozen=True, slots=True)
class Held:
    """A back-off that began: until when (wall clock), for how long, and the delay asked if
    capped."""

    until: float
    seconds: float
    asked: float | None  # the delay the server named, when more than the cap


@dataclass
class Backoff:
    """The time before which a server is not to be asked, shared by the threads that query
    it. Kept on `clock` (monotonic): a wall clock stepped back by NTP during a back-off must
    not stretch it past RETRY_AFTER_MAX_SECONDS; the wall clock only reads an HTTP-date and
    names the end in messages."""

    until: float = 0.0  # on `clock`
    ends_at: float = 0.0  # wall-clock seconds, for messages
    why: str = ""  # what the server said, for the signals read as stale meanwhile
    clock: Callable[[], float] = time.monotonic
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def waiting(self) -> str | None:
        """Why nothing is to be asked now ("not asked until …: …"), or None."""
        with self._lock:
            if self.clock() >= self.until:
                return None
            until = dt.datetime.fromtimestamp(self.ends_at, dt.UTC).strftime("%H:%M:%SZ")
            return f"not asked until {until}: {self.why}"

    def hold(self, status: int, value: str, now: float, server: str) -> Held | None:
        """Keep an answer's Retry-After (`now`: wall-clock seconds, for an HTTP-date); the
        back-off that began, if this answer began one (the concurrent queries of a tick all
        hear it: one of them says so). Raises MalformedRetryAfterError for a value that says
        no time."""
        asked = retry_after_seconds(value, now)
        seconds = min(asked, RETRY_AFTER_MAX_SECONDS)
        with self._lock:
            tick = self.clock()
            began = tick >= self.until
            if tick + seconds <= self.until or seconds <= 0:
                return None
            self.until, self.ends_at = tick + seconds, now + seconds
            self.why = f"{server} answered HTTP {status} with Retry-After: {value.strip()[:64]}"
            held = Held(self.ends_at, seconds, asked if asked > seconds else None)
        return held if began else None
