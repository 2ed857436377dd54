"""How numbers and times are written in reasons, so every reason reads the same way."""

from __future__ import annotations

import datetime as dt
import math


def fmt_number(value: float | None) -> str:
    """Six significant digits, `n/a` for a missing or NaN value."""
    if value is None or math.isnan(value):
        return "n/a"
    return f"{value:.6g}"


def fmt_time(ts: float) -> str:
    """Unix seconds as compact UTC (the journal keeps the exact timestamps)."""
    return dt.datetime.fromtimestamp(ts, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
