"""Backfilled history for the signal tests: GPU gauges, per-tenant gauges with awkward shapes,
and days of per-tenant spend with the anomaly cases (jump, steady, new, gap, shifted
morning peak, weekly pattern)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from tests.support.prometheus import Series

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
STEP = 60.0  # one backfilled sample per minute
BASE_RATE = 0.02  # $/s a normal tenant spends
PEAK_RATE = 0.10  # 5× the base

GPU_UTIL = {"0": 0.5, "1": 0.6, "2": 0.7, "3": 0.8}
QUEUE_DEPTH = {"acme": 3.0, "globex": 5.0, "initech": math.nan}

# The shipped policy's baseline and the recommended one (docs/signals.md).
SPEND = "sum by (tenant) (rate(gateway_cost_usd_total[5m]))"
USUAL_NAIVE = "sum by (tenant) (rate(gateway_cost_usd_total[1h] offset 1d))"
USUAL_YESTERDAY = (
    "max_over_time(sum by (tenant) (rate(gateway_cost_usd_total[1h]))[2h:10m] offset 23h)"
)
USUAL = (
    "max by (tenant) ("
    "max_over_time(sum by (tenant) (rate(gateway_cost_usd_total[1h]))[2h:10m] offset 23h) or "
    "label_replace("
    "max_over_time(sum by (tenant) (rate(gateway_cost_usd_total[1h]))[2h:10m] offset 6d23h), "
    '"baseline", "7d", "", ""))'
)
CONDITION = "spend > 3.0 * usual && spend > 0.01"


def last_sample(now: float) -> float:
    """The newest backfilled sample time: a minute before `now`."""
    return now - STEP


def _times(start: float, end: float) -> Iterator[float]:
    t = start
    while t <= end:
        yield t
        t += STEP


def _gauge(name: str, labels: dict[str, str], value: float, now: float) -> Series:
    samples = [(t, value) for t in _times(now - 30 * MINUTE, last_sample(now))]
    return Series(name, labels, samples)


def _spend(tenant: str, rate: Callable[[float], float], start: float, now: float) -> Series:
    """A cost counter integrating `rate` ($/s); samples where the rate is NaN are a gap."""
    total, samples = 0.0, []
    for t in _times(start, last_sample(now)):
        current = rate(t)
        total += (0.0 if math.isnan(current) else current) * STEP
        if not math.isnan(current):
            samples.append((t, round(total, 6)))
    return Series("gateway_cost_usd", {"tenant": tenant}, samples, kind="counter")


def gauges(now: float) -> list[Series]:
    """`gpu_util` per GPU, `queue_depth` per tenant (one NaN), duplicates and unlabelled."""
    out = [_gauge("gpu_util", {"gpu": g}, v, now) for g, v in GPU_UTIL.items()]
    out += [_gauge("queue_depth", {"tenant": t}, v, now) for t, v in QUEUE_DEPTH.items()]
    out += [_gauge("replica_load", {"tenant": "acme", "replica": r}, 1.0, now) for r in "ab"]
    out += [_gauge("pool_load", {"tenant": "acme"}, 1.0, now), _gauge("pool_load", {}, 2.0, now)]
    out.append(_gauge("not_a_number", {}, math.nan, now))
    return out


def spend(now: float) -> list[Series]:
    """Two days of spend (eight for `weekly`). `jumper` goes 5× for the last 15 minutes;
    `steady` never changes; `newbie` exists for 20 minutes; `gappy` has no data from 27 h to
    22 h ago; `morning` has a daily peak that started 20 minutes ago today but 10 minutes
    later yesterday; `weekly` is busy (5×) today and on this day last week, quiet yesterday
    (a Monday after a Sunday)."""
    start = now - 2 * DAY

    def jump(t: float) -> float:
        return PEAK_RATE if t > now - 15 * MINUTE else BASE_RATE

    def gap(t: float) -> float:
        # Wider than everything `usual` reads at any tick: rates over 1 h windows ending
        # from 25 h to 23 h before the evaluation time.
        hole = now - DAY - 3 * HOUR < t < now - DAY + 2 * HOUR
        return math.nan if hole else jump(t)

    def morning(t: float) -> float:
        day_start = now - 20 * MINUTE if t > now - 12 * HOUR else now - DAY + 10 * MINUTE
        in_peak = day_start <= t < day_start + 2 * HOUR
        return PEAK_RATE if in_peak else BASE_RATE

    def week(t: float) -> float:
        ago = now - t
        busy = ago < 6 * HOUR or abs(ago - 7 * DAY) < 6 * HOUR
        return PEAK_RATE if busy else BASE_RATE

    return [
        _spend("jumper", jump, start, now),
        _spend("weekly", week, now - 8 * DAY, now),
        _spend("steady", lambda t: BASE_RATE, start, now),
        _spend("newbie", lambda t: PEAK_RATE, now - 20 * MINUTE, now),
        _spend("gappy", gap, start, now),
        _spend("morning", morning, start, now),
    ]
