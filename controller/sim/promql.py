"""Evaluate PromQL over the simulated series: the subset policies use, with Prometheus'
semantics (5m lookback, extrapolated rate/increase, offsets, subqueries aligned to their
step, aggregations by/without, arithmetic and comparisons with one-to-one matching,
`or`/`and`/`unless`, label_replace, histogram_quantile).

Parsing is promql-parser's (the Prometheus grammar); anything this evaluator does not
know raises SimQueryError naming it, so a scenario can map that query (`signals:`).
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import promql_parser as pq

from controller.errors import GovernorError
from controller.model import FloatArray
from controller.promql_grammar import parse
from controller.sim.series import Labels, SeriesStore

LOOKBACK = 300.0  # Prometheus' default lookback delta for instant selectors


class SimQueryError(GovernorError):
    """A query the simulator cannot evaluate; map it to a simulated metric in the scenario."""


@dataclass(frozen=True, slots=True)
class Point:
    labels: Labels
    value: float


@dataclass(frozen=True, slots=True)
class Range:
    labels: Labels
    times: FloatArray
    values: FloatArray


Value: TypeAlias = float | list[Point] | list[Range]


def _drop_name(labels: Labels) -> Labels:
    return tuple(p for p in labels if p[0] != "__name__")


def _seconds(delta: Any) -> float:
    return float(delta.total_seconds()) if delta is not None else 0.0


def _matches(labels: Labels, matchers: Iterable[pq.Matcher]) -> bool:
    found = dict(labels)
    for m in matchers:
        value = found.get(m.name, "")
        if m.op == pq.MatchOp.Equal and value != m.value:
            return False
        if m.op == pq.MatchOp.NotEqual and value == m.value:
            return False
        if m.op == pq.MatchOp.Re and not re.fullmatch(m.value, value):
            return False
        if m.op == pq.MatchOp.NotRe and re.fullmatch(m.value, value):
            return False
    return True


def _selected(store: SeriesStore, selector: pq.VectorSelector) -> Iterable[Any]:
    """The series a selector picks: by its name, or by `__name__` matchers (a regex such as
    `{__name__=~"vllm[:_]kv_cache_usage_perc"}` reads either spelling of a name)."""
    matchers = list(selector.matchers.matchers)
    on_name = [m for m in matchers if m.name == "__name__"]
    others = [m for m in matchers if m.name != "__name__"]
    if selector.name is not None:
        names = [selector.name]
    else:
        names = [n for n in store.by_name if _matches((("__name__", n),), on_name)]
    return (s for name in names for s in store.named(name) if _matches(s.labels, others))


def extrapolated(
    times: FloatArray, values: FloatArray, start: float, end: float, *, counter: bool, rate: bool
) -> float | None:
    """Prometheus' extrapolatedRate: rate(), increase() and delta() of one series."""
    if len(times) < 2:
        return None
    result = float(values[-1] - values[0])
    if counter:
        drops = values[1:] < values[:-1]
        result += float(values[:-1][drops].sum())
    to_start, to_end = float(times[0] - start), float(end - times[-1])
    sampled = float(times[-1] - times[0])
    average = sampled / (len(times) - 1)
    if counter and result > 0 and values[0] >= 0:
        to_start = min(to_start, sampled * (float(values[0]) / result))
    threshold = average * 1.1
    extent = sampled
    extent += to_start if to_start < threshold else average / 2
    extent += to_end if to_end < threshold else average / 2
    result *= extent / sampled
    return result / (end - start) if rate else result


_OVER_TIME: dict[str, Callable[[FloatArray], float]] = {
    "avg_over_time": lambda v: float(v.mean()),
    "max_over_time": lambda v: float(v.max()),
    "min_over_time": lambda v: float(v.min()),
    "sum_over_time": lambda v: float(v.sum()),
    "count_over_time": lambda v: float(len(v)),
    "last_over_time": lambda v: float(v[-1]),
}
_ELEMENTWISE: dict[str, Callable[[float], float]] = {
    "abs": abs,
    "ceil": math.ceil,
    "floor": math.floor,
    "sqrt": lambda x: math.sqrt(x) if x >= 0 else math.nan,
    "exp": math.exp,
    "ln": lambda x: math.log(x) if x > 0 else (-math.inf if x == 0 else math.nan),
}
_AGGREGATE: dict[str, Callable[[list[float]], float]] = {
    "sum": sum,
    "avg": lambda v: sum(v) / len(v),
    "max": max,
    "min": min,
    "count": lambda v: float(len(v)),
    "group": lambda v: 1.0,
}
_ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a)),
    "%": lambda a, b: math.fmod(a, b) if b else math.nan,
    "^": lambda a, b: float(a**b),
}
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
}


class Evaluator:
    """Evaluates parsed expressions over a SeriesStore at a time `t` (unix seconds)."""

    def __init__(self, store: SeriesStore) -> None:
        self.store = store
        self._parsed: dict[str, pq.Expr] = {}
        # Subquery steps at or before the store's horizon never change: evaluated once.
        self._steps: dict[tuple[str, float], Value] = {}

    def parse(self, query: str) -> pq.Expr:
        found = self._parsed.get(query)
        if found is None:
            try:
                found = self._parsed[query] = parse(query)
            except Exception as exc:  # the parser raises bare errors with its message
                raise SimQueryError(f"query {query!r} does not parse: {exc}") from None
        return found

    def instant(self, query: str, t: float) -> tuple[Value, float]:
        """The value of `query` at `t` and the time of the oldest newest-sample among the
        selectors it reads (as controller.signals measures freshness)."""
        expr = self.parse(query)
        value = self.eval(expr, t)
        if isinstance(value, list) and value and isinstance(value[0], Range):
            raise SimQueryError(
                f"query {query!r} returns a range vector; wrap it in rate(...) or "
                "avg_over_time(...)"
            )
        return value, self.freshness(expr, t)

    def freshness(self, expr: pq.Expr, t: float) -> float:
        newest: list[float] = []

        def visit(node: pq.Expr) -> bool:
            if isinstance(node, pq.VectorSelector):
                stamps = [s.newest(t) for s in _selected(self.store, node)]
                known = [stamp[0] for stamp in stamps if stamp and t - stamp[0] <= LOOKBACK]
                newest.append(max(known) if known else 0.0)
            return True

        pq.walk(expr, visit)
        return min(newest) if newest else t

    def eval(self, expr: pq.Expr, t: float) -> Value:
        if isinstance(expr, pq.NumberLiteral):
            return float(expr.val)
        if isinstance(expr, pq.ParenExpr):
            return self.eval(expr.expr, t)
        if isinstance(expr, pq.UnaryExpr):
            return _apply(self.eval(expr.expr, t), lambda x: -x)
        if isinstance(expr, pq.VectorSelector):
            return self._vector(expr, t)
        if isinstance(expr, pq.MatrixSelector):
            return self._matrix(expr, t)
        if isinstance(expr, pq.SubqueryExpr):
            return self._subquery(expr, t)
        if isinstance(expr, pq.Call):
            return self._call(expr, t)
        if isinstance(expr, pq.AggregateExpr):
            return self._aggregate(expr, t)
        if isinstance(expr, pq.BinaryExpr):
            return self._binary(expr, t)
        raise SimQueryError(f"the simulator cannot evaluate {type(expr).__name__} ({expr})")

    def _vector(self, selector: pq.VectorSelector, t: float) -> list[Point]:
        at = t - _seconds(selector.offset)
        out = []
        for series in _selected(self.store, selector):
            newest = series.newest(at)
            if newest is not None and at - newest[0] <= LOOKBACK:
                out.append(Point(series.labels, newest[1]))
        return out

    def _matrix(self, matrix: pq.MatrixSelector, t: float) -> list[Range]:
        selector = matrix.vector_selector
        end = t - _seconds(selector.offset)
        start = end - _seconds(matrix.range)
        out = []
        for series in _selected(self.store, selector):
            times, values = series.window(start, end)
            if len(times):
                out.append(Range(series.labels, times, values))
        return out

    def _subquery(self, sub: pq.SubqueryExpr, t: float) -> list[Range]:
        step = _seconds(sub.step) or 60.0
        end = t - _seconds(sub.offset)
        start = end - _seconds(sub.range)
        first = math.floor(start / step) * step
        if first <= start:
            first += step
        collected: dict[Labels, tuple[list[float], list[float]]] = {}
        moment = first
        inner = str(sub.expr)
        while moment <= end + 1e-9:
            value = self._steps.get((inner, moment))
            if value is None:
                value = self.eval(sub.expr, moment)
                if moment <= self.store.horizon:
                    self._steps[(inner, moment)] = value
            if not isinstance(value, list):
                raise SimQueryError(f"subquery {sub} must return an instant vector")
            for point in value:
                if isinstance(point, Point):
                    times, values = collected.setdefault(point.labels, ([], []))
                    times.append(moment)
                    values.append(point.value)
            moment += step
        return [Range(k, np.array(v[0]), np.array(v[1])) for k, v in collected.items()]

    def _ranges(self, expr: pq.Expr, t: float, name: str) -> list[Range]:
        value = self.eval(expr, t)
        if not isinstance(value, list) or (value and not isinstance(value[0], Range)):
            raise SimQueryError(f"{name}() needs a range vector such as x[5m]")
        return [r for r in value if isinstance(r, Range)]

    def _call(self, call: pq.Call, t: float) -> Value:
        name = call.func.name
        args = list(call.args)
        if name in ("rate", "increase", "delta", "irate"):
            return self._rate(name, args[0], t)
        if name in _OVER_TIME:
            return [
                Point(_drop_name(r.labels), _OVER_TIME[name](r.values))
                for r in self._ranges(args[0], t, name)
            ]
        if name in _ELEMENTWISE:
            return _apply(self.eval(args[0], t), _ELEMENTWISE[name])
        if name in ("clamp_min", "clamp_max", "clamp"):
            bounds = [self._scalar(a, t, name) for a in args[1:]]
            low = bounds[0] if name in ("clamp_min", "clamp") else -math.inf
            high = bounds[-1] if name in ("clamp_max", "clamp") else math.inf
            return _apply(self.eval(args[0], t), lambda x: min(max(x, low), high))
        return self._special(name, args, t)

    def _special(self, name: str, args: list[pq.Expr], t: float) -> Value:
        """The functions that are neither per-element nor over a range."""
        if name == "histogram_quantile":
            quantile = self._scalar(args[0], t, name)
            return _histogram_quantile(quantile, _points(self.eval(args[1], t)))
        if name == "label_replace":
            return _label_replace(self.eval(args[0], t), [_string(a, name) for a in args[1:]])
        if name == "time":
            return t
        if name == "vector":
            return [Point((), self._scalar(args[0], t, name))]
        if name == "scalar":
            value = self.eval(args[0], t)
            if isinstance(value, list):
                points = [p for p in value if isinstance(p, Point)]
                return points[0].value if len(points) == 1 else math.nan
            return value
        raise SimQueryError(
            f"the simulator does not evaluate {name}(); map this query to a simulated metric "
            "in the scenario's `signals:`"
        )

    def _rate(self, name: str, arg: pq.Expr, t: float) -> list[Point]:
        if not isinstance(arg, pq.MatrixSelector):
            raise SimQueryError(f"{name}() needs a range selector such as x[5m]")
        end = t - _seconds(arg.vector_selector.offset)
        start = end - _seconds(arg.range)
        out = []
        for r in self._matrix(arg, t):
            if name == "irate":
                if len(r.times) < 2:
                    continue
                drop = r.values[-1] < r.values[-2]
                change = r.values[-1] if drop else r.values[-1] - r.values[-2]
                value: float | None = float(change / (r.times[-1] - r.times[-2]))
            else:
                value = extrapolated(
                    r.times,
                    r.values,
                    start,
                    end,
                    counter=name != "delta",
                    rate=name == "rate",
                )
            if value is not None:
                out.append(Point(_drop_name(r.labels), value))
        return out

    def _scalar(self, expr: pq.Expr, t: float, where: str) -> float:
        value = self.eval(expr, t)
        if isinstance(value, list):
            raise SimQueryError(f"{where}() takes a number here")
        return value

    def _aggregate(self, agg: pq.AggregateExpr, t: float) -> list[Point]:
        op = str(agg.op)
        if op not in _AGGREGATE:
            raise SimQueryError(f"the simulator does not evaluate the aggregation {op}()")
        value = self.eval(agg.expr, t)
        if not isinstance(value, list):
            raise SimQueryError(f"{op}() aggregates a vector, not a number")
        modifier = agg.modifier
        groups: dict[Labels, list[float]] = {}
        for point in value:
            if not isinstance(point, Point):
                raise SimQueryError(f"{op}() aggregates an instant vector, not a range")
            if modifier is None:
                key: Labels = ()
            elif modifier.type == pq.AggModifierType.By:
                key = tuple(p for p in point.labels if p[0] in modifier.labels)
            else:
                dropped = {*modifier.labels, "__name__"}
                key = tuple(p for p in point.labels if p[0] not in dropped)
            groups.setdefault(key, []).append(point.value)
        return [Point(k, _AGGREGATE[op](v)) for k, v in groups.items()]

    def _binary(self, expr: pq.BinaryExpr, t: float) -> Value:
        op = str(expr.op)
        lhs, rhs = self.eval(expr.lhs, t), self.eval(expr.rhs, t)
        keep_bool = expr.modifier is not None and expr.modifier.return_bool
        if op in _ARITHMETIC:
            return _combine(lhs, rhs, _ARITHMETIC[op], expr.modifier)
        if op in _COMPARE:
            test = _COMPARE[op]
            if not isinstance(lhs, list) and not isinstance(rhs, list):
                return 1.0 if test(lhs, rhs) else 0.0
            if keep_bool:
                return _combine(lhs, rhs, lambda a, b: 1.0 if test(a, b) else 0.0, expr.modifier)
            return _filter(lhs, rhs, test, expr.modifier)
        if op in ("or", "and", "unless"):
            return _set_operation(op, lhs, rhs, expr.modifier)
        raise SimQueryError(f"the simulator does not evaluate the operator {op!r}")


def _string(arg: pq.Expr, where: str) -> str:
    if not isinstance(arg, pq.StringLiteral):
        raise SimQueryError(f"{where}() takes string literals after the vector")
    return str(arg.val)


# Go's regexp.Expand: `$1`, `${1}`, `$name`, `${name}`; `$$` is a dollar sign.
_REFERENCE = re.compile(r"\$(?:\$|\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


def _expand(template: str, match: re.Match[str]) -> str:
    def group(ref: re.Match[str]) -> str:
        name = ref.group(1) or ref.group(2)
        if name is None:
            return "$"
        try:
            return match.group(int(name) if name.isdigit() else name) or ""
        except IndexError:
            return ""  # Go expands a group that does not exist to nothing

    return _REFERENCE.sub(group, template)


def _label_replace(value: Value, args: list[str]) -> list[Point]:
    """Prometheus' label_replace: where `regex` matches the whole of `src`'s value, `dst` is
    set to the expanded replacement (an empty result removes it); other series pass as is."""
    if not isinstance(value, list):
        raise SimQueryError("label_replace() takes an instant vector")
    dst, replacement, src, regex = args
    if not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", dst):
        raise SimQueryError(f"label_replace(): invalid destination label name {dst!r}")
    try:
        pattern = re.compile(f"(?:{regex})\\Z")
    except re.error as exc:
        raise SimQueryError(f"label_replace(): invalid regex {regex!r}: {exc}") from exc
    out = []
    for point in _points(value):
        labels = dict(point.labels)
        match = pattern.match(labels.get(src, ""))
        if match is not None:
            expanded = _expand(replacement, match)
            if expanded:
                labels[dst] = expanded
            else:
                labels.pop(dst, None)
        out.append(Point(tuple(sorted(labels.items())), point.value))
    if len({p.labels for p in out}) < len(out):
        # Prometheus refuses such a result too, rather than keep one of the series.
        raise SimQueryError("label_replace(): the result has two series with the same labels")
    return out


def _histogram_quantile(quantile: float, buckets: list[Point]) -> list[Point]:
    """Prometheus' histogram_quantile over classic buckets (`le`), per label set without
    `le`: linear within the bucket the rank falls in, 0 as the lowest bucket's start, the
    highest finite bound when the rank falls in +Inf, NaN without observations."""
    groups: dict[Labels, dict[float, float]] = {}
    for point in buckets:
        found = dict(point.labels)
        if "le" not in found:
            continue
        key = tuple(p for p in _drop_name(point.labels) if p[0] != "le")
        bound = float(found["le"])
        group = groups.setdefault(key, {})
        group[bound] = group.get(bound, 0.0) + point.value
    return [Point(key, _bucket_quantile(quantile, group)) for key, group in groups.items()]


def _bucket_quantile(quantile: float, counts: dict[float, float]) -> float:
    if math.isnan(quantile):
        return math.nan
    if quantile < 0 or quantile > 1:
        return -math.inf if quantile < 0 else math.inf
    bounds = sorted(counts)
    if len(bounds) < 2 or not math.isinf(bounds[-1]):
        return math.nan
    # Counts sampled at slightly different times may dip: held monotonic, as Prometheus does.
    cumulative = np.maximum.accumulate([counts[b] for b in bounds])
    total = float(cumulative[-1])
    if total <= 0:
        return math.nan
    rank = quantile * total
    k = int(np.searchsorted(cumulative, rank, side="left"))
    if k >= len(bounds) - 1:
        return bounds[-2]
    if k == 0 and bounds[0] <= 0:
        return bounds[0]
    start, below = (0.0, 0.0) if k == 0 else (bounds[k - 1], float(cumulative[k - 1]))
    inside = float(cumulative[k]) - below
    if inside <= 0:
        return bounds[k]
    return start + (bounds[k] - start) * (rank - below) / inside


def _apply(value: Value, fn: Callable[[float], float]) -> Value:
    if isinstance(value, list):
        return [Point(_drop_name(p.labels), fn(p.value)) for p in value if isinstance(p, Point)]
    return fn(value)


def _match_key(labels: Labels, modifier: pq.BinModifier | None) -> Labels:
    base = _drop_name(labels)
    matching = modifier.matching if modifier is not None else None
    if matching is None:
        return base
    if matching.type == pq.LabelModifierType.Include:
        return tuple(p for p in base if p[0] in matching.labels)
    return tuple(p for p in base if p[0] not in matching.labels)


def _points(value: Value) -> list[Point]:
    if not isinstance(value, list):
        return []
    return [p for p in value if isinstance(p, Point)]


def _combine(
    lhs: Value, rhs: Value, fn: Callable[[float, float], float], modifier: pq.BinModifier | None
) -> Value:
    if not isinstance(lhs, list) and not isinstance(rhs, list):
        return fn(lhs, rhs)
    if not isinstance(rhs, list):
        return [Point(_drop_name(p.labels), fn(p.value, rhs)) for p in _points(lhs)]
    if not isinstance(lhs, list):
        return [Point(_drop_name(p.labels), fn(lhs, p.value)) for p in _points(rhs)]
    right = {_match_key(p.labels, modifier): p.value for p in _points(rhs)}
    out = []
    for p in _points(lhs):
        key = _match_key(p.labels, modifier)
        if key in right:
            out.append(Point(_drop_name(p.labels), fn(p.value, right[key])))
    return out


def _filter(
    lhs: Value, rhs: Value, test: Callable[[float, float], bool], modifier: pq.BinModifier | None
) -> list[Point]:
    if not isinstance(rhs, list):
        return [p for p in _points(lhs) if test(p.value, rhs)]
    if not isinstance(lhs, list):
        return [p for p in _points(rhs) if test(lhs, p.value)]
    right = {_match_key(p.labels, modifier): p.value for p in _points(rhs)}
    return [
        p
        for p in _points(lhs)
        if (key := _match_key(p.labels, modifier)) in right and test(p.value, right[key])
    ]


def _set_operation(op: str, lhs: Value, rhs: Value, modifier: pq.BinModifier | None) -> Value:
    """`or` (union), `and` (intersection), `unless` (difference), matched on label sets."""
    if not isinstance(lhs, list) or not isinstance(rhs, list):
        raise SimQueryError(f"`{op}` works on two vectors")
    right = {_match_key(p.labels, modifier) for p in _points(rhs)}
    left = _points(lhs)
    if op == "and":
        return [p for p in left if _match_key(p.labels, modifier) in right]
    if op == "unless":
        return [p for p in left if _match_key(p.labels, modifier) not in right]
    seen = {_match_key(p.labels, modifier) for p in left}
    return left + [p for p in _points(rhs) if _match_key(p.labels, modifier) not in seen]


def as_api_result(value: Value, t: float) -> list[Any]:
    """The answer as prometheus-api-client returns `data.result` (for controller.signals'
    decoders): a scalar [t, "v"] or a list of {"metric": ..., "value": [t, "v"]}."""
    if not isinstance(value, list):
        return [t, repr(float(value))]
    return [
        {"metric": dict(_drop_name(p.labels)), "value": [t, repr(float(p.value))]}
        for p in value
        if isinstance(p, Point)
    ]
