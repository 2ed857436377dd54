"""How numbers and times are written in reasons, so every reason reads the same way."""

from __future__ import annotations

import datetime as dt

from controller.model import fmt_number

__all__ = ["fmt_number", "fmt_time"]


def fmt_time(ts: float) -> str:
    """Unix seconds as compact UTC (the journal keeps the exact timestamps)."""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
