"""The Prometheus signal source: every distinct query of a tick runs once, concurrently, with
a timeout, and comes back as a snapshot sample whose validity says what went wrong.

Errors never escape `fetch`: a failing query becomes a Validity.ERROR sample whose detail
names the query and the cause, so only the policies that read it degrade.
"""

from __future__ import annotations

import concurrent.futures
import email.utils
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any

import numpy as np
import requests
import structlog
import urllib3

from controller.clients.backoff import (
    RETRY_STATUSES,
    Backoff,
    Held,
    MalformedRetryAfterError,
)
from controller.clients.prometheus import (
    CutShortError,
    PrometheusConnection,
    SlowAnswerError,
    TooLargeAnswerError,
    client_options,
    connection_cause,
    error_detail,
    not_json,
    open_connection,
    read_body,
    redirected,
    tls_cause,
)
from controller.durations import format_duration
from controller.errors import SignalError
from controller.model import Sample, ScalarSample, SignalKey, Snapshot, Validity, VectorSample
from controller.settings import PrometheusSettings
from controller.signals.decode import (
    MAX_LABEL_LENGTH,
    DroppedLabels,
    ResultShapeError,
    decode_scalar,
    decode_vector,
    parse_body,
    vector_from_body,
)
from controller.signals.freshness import History, SampleTimes
from controller.signals.promql import QuerySyntaxError, selectors

# The server-side `timeout` fires first, so the answer says "timeout" with Prometheus' own
# words instead of a bare socket error; the HTTP timeout is the backstop.
_HTTP_GRACE_SECONDS = 1.0
# Prometheus' answer puts `warnings` after `data`; inside a JSON string a quote is escaped,
# so these bytes can only be the top-level key.
_WARNINGS_KEY = b'"warnings":['
_VM_PARTIAL_KEY = b'"isPartial":true'
_VM_PARTIAL = "isPartial: some of the data was unavailable (a VictoriaMetrics storage node?)"
# Prometheus (and Thanos, Mimir, VictoriaMetrics) write `status` first. It is read there,
# not searched for: `"status":"success"` is also how a series labelled status="success"
# shows, and a proxy may answer HTTP 200 with `status: error` and a `data` part.
_SUCCESS_HEAD = b'{"status":"success",'


@dataclass(frozen=True, slots=True)
class Answer:
    """One query's successful answer as received (Prometheus' JSON bytes), or why there is
    none. The bytes are decoded by whoever reads them: a vector straight into arrays."""

    body: bytes = b""
    warnings: tuple[str, ...] = ()
    error: str | None = None
    # How far Prometheus' clock is at least ahead of this host's (its Date header, whole
    # seconds, written after the query ran, minus the time it arrived: a lower bound).
    ahead: float = 0.0

    @property
    def result(self) -> Sequence[Any]:
        """The answer's `data.result`, fully parsed (small answers: scalars, freshness)."""
        if not self.body:
            return ()
        result: Sequence[Any] = parse_body(self.body)["data"]["result"]
        return result


# A clock ahead by less is lost in a scrape interval; the estimate is a lower bound anyway.
_CLOCK_AHEAD_WARN_SECONDS = 5.0


def _clock_ahead(response: requests.Response) -> float:
    """Prometheus' Date minus the time its answer arrived here; 0.0 without a usable Date."""
    try:
        sent = email.utils.parsedate_to_datetime(response.headers["Date"]).timestamp()
    except (KeyError, TypeError, ValueError, IndexError):
        return 0.0
    return sent - time.time()


def _warnings(body: bytes) -> tuple[str, ...]:
    # VictoriaMetrics (cluster) marks an answer missing some storage nodes' data with
    # `"isPartial":true` next to `status` and no warning; read it as Thanos' and Mimir's
    # warnings are (label values are strings: a bare `true` there can only be this key).
    ends = body[:200] + body[-200:]  # next to `status`, or after `data`: not inside it
    partial = (_VM_PARTIAL,) if _VM_PARTIAL_KEY in ends else ()
    if body.rfind(_WARNINGS_KEY) < 0:
        return partial
    return partial + tuple(str(w) for w in parse_body(body).get("warnings") or ())


class _NotJsonError(ValueError):
    """An HTTP 200 answer that is not JSON at all."""


def _parsed(response: requests.Response, body: bytes) -> object:
    try:
        return parse_body(body)
    except ValueError:
        raise _NotJsonError(not_json(response.headers.get("Content-Type"), body)) from None


def _not_success(answer: object) -> str | None:
    """Why a parsed answer is not a successful one (None when it is): a `status` other than
    success is Prometheus' error whatever the HTTP status and whatever `data` it carries."""
    if not isinstance(answer, dict):
        return "not a Prometheus query answer: JSON that is not an object"
    status = answer.get("status")
    if status != "success":
        said = f"{answer.get('errorType', '')}: {answer.get('error', '')}".strip(": ")
        return f"answered status {status!r} with HTTP 200" + (f" ({said[:200]})" if said else "")
    return None  # a success without `data` is told by whoever reads it (age, vector, ...)


@dataclass
class PrometheusSource:
    """Reads a tick's signals from one Prometheus; use as a context manager or call close()."""

    settings: PrometheusSettings
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _connections: list[PrometheusConnection] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _pool: concurrent.futures.ThreadPoolExecutor | None = field(default=None, repr=False)
    # Called with how many series were dropped for an invalid label value (a metric).
    on_labels_dropped: Callable[[int], None] | None = field(default=None, repr=False)
    dropped_labels: DroppedLabels = field(default_factory=DroppedLabels, repr=False)

    def __post_init__(self) -> None:
        self._options = client_options(self.settings)
        self._clock_noted: float | None = None  # monotonic time of the last clock warning
        self._backoff = Backoff()  # Retry-After: no query before its time
        self._malformed_noted: float | None = None  # monotonic time of the last such warning
        self._max_bytes = int(self.settings.max_answer_megabytes * 1e6)
        self._times = SampleTimes(self.settings.sample_age_refresh_seconds)
        self._history = History()
        if not self.settings.verify_tls and self.settings.url.startswith("https:"):
            # Said once here instead of urllib3's warning on every query of every tick.
            structlog.get_logger("governor.signals").warning(
                "prometheus.tls_unverified",
                url=self.url,
                detail="GOVERNOR_PROMETHEUS__VERIFY_TLS=false: the server is not authenticated",
            )
            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.settings.max_concurrency, thread_name_prefix="prometheus"
        )

    @classmethod
    def from_url(cls, url: str, **settings: Any) -> PrometheusSource:
        """A source with default settings but these (tests, scripts)."""
        return cls(PrometheusSettings(url=url, **settings))

    @property
    def url(self) -> str:
        """The Prometheus URL as shown in messages: a `user:password@` part is dropped."""
        parts = urllib.parse.urlsplit(self.settings.url)
        return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()

    @property
    def http_timeout(self) -> float:
        return self.settings.timeout_seconds + _HTTP_GRACE_SECONDS

    def fetch(self, keys: Iterable[SignalKey], now: float) -> Snapshot:
        """Evaluate every distinct query once at `now`; never raises for a failing query."""
        wanted = list(dict.fromkeys(keys))
        reads, unparsed = _reads(dict.fromkeys(k.query for k in wanted))
        every = [s for found in reads.values() for s in found]
        needs = {s: k.history for k in wanted if k.history for s in reads[k.query]}
        probes = self._history.due(needs, now)
        answers = self.run([*reads, *self._times.due(every, now), *probes], now)
        self._times.update(every, answers, now)
        self._history.update(probes, answers)
        dropped: list[str] = []
        samples = {
            key: self._sample(key, answers[key.query], reads[key.query], now, dropped)
            for key in wanted
        }
        _untold_ages(samples, unparsed)
        self._note_dropped(dropped, now)
        self._note_clock(answers.values())
        return Snapshot(taken_at=now, samples=samples)

    def _note_clock(self, answers: Iterable[Answer]) -> None:
        """Warn, once an hour, when Prometheus' clock is ahead of this host's. Each query is
        evaluated at this host's time, so its answer is as of that much in Prometheus' past
        while the sample ages, taken on the same clock, cannot show it."""
        ahead = max((a.ahead for a in answers), default=0.0)
        if ahead < _CLOCK_AHEAD_WARN_SECONDS:
            return
        wall = time.monotonic()
        if self._clock_noted is not None and wall - self._clock_noted < 3600.0:
            return
        self._clock_noted = wall
        structlog.get_logger("governor.signals").warning(
            "prometheus.clock_ahead",
            url=self.url,
            seconds=round(ahead),
            detail=f"Prometheus' clock is at least {ahead:.0f} s ahead of this host's: every "
            f"signal is that much older than its age says; sync both clocks (NTP)",
        )

    def _note_dropped(self, values: list[str], now: float) -> None:
        """Count the label values dropped as invalid; note each at most once an hour, shown
        escaped and cut short (the value itself is what cannot be trusted)."""
        if not values:
            return
        for value in self.dropped_labels.add(values, now):
            structlog.get_logger("governor.signals").warning(
                "signal.label_dropped",
                value=ascii(value[:64]),
                length=len(value),
                rule=f"a label value is 1 to {MAX_LABEL_LENGTH} printable characters "
                "(docs/signals.md); its series is ignored, noted once an hour",
            )
        if self.on_labels_dropped is not None:
            self.on_labels_dropped(len(values))

    def run(self, queries: Iterable[str], now: float) -> dict[str, Answer]:
        """Run distinct queries concurrently (bounded pool); a query without an answer in
        time is an error, and nothing raises."""
        distinct = list(dict.fromkeys(queries))
        assert self._pool is not None, "the source is closed"
        futures = {q: self._pool.submit(self.query, q, now) for q in distinct}
        rounds = math.ceil(len(distinct) / self.settings.max_concurrency)
        budget = 2 * self.http_timeout * max(rounds, 1)
        concurrent.futures.wait(futures.values(), timeout=budget)
        answers = {}
        for query, future in futures.items():
            if future.done() and future.exception() is not None:
                answers[query] = Answer(error=f"unexpected failure: {future.exception()!r}")
            elif future.done():
                answers[query] = future.result()
            else:
                future.cancel()
                answers[query] = Answer(error=f"no answer within {budget:.0f}s")
        return answers

    def query(self, query: str, now: float) -> Answer:
        """One instant query at `now` on the client's session, errors as values."""
        params = {"query": query, "time": f"{now:.3f}"}
        return self._get("query", params)

    def query_range(self, query: str, start: float, end: float, step: float) -> Sequence[Any]:
        """One range query (the backtest) on the path and with the guards of the instant
        queries (auth, TLS, retry policy, size cap, deadline, redirects, `status`,
        Retry-After). Raises SignalError naming the query and the cause in one line."""
        params = {"query": query, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"}
        answer = self._get("query_range", params)
        failed = f"range query {query!r} failed"
        if answer.error is not None:
            raise SignalError(f"{failed}: {answer.error}")
        try:
            data = parse_body(answer.body)["data"]
            kind, result = data["resultType"], data["result"]
        except (KeyError, TypeError, ValueError) as exc:  # a body cut between two series
            raise SignalError(f"{failed}: not a Prometheus range answer ({exc!r})") from exc
        if kind != "matrix" or not isinstance(result, list):
            raise SignalError(
                f"{failed}: not a Prometheus range answer: resultType {kind!r}, not 'matrix' "
                "(a proxy in front of Prometheus rewriting the path?)"
            )
        return result

    def _get(self, endpoint: str, params: Mapping[str, str]) -> Answer:
        """One GET of Prometheus' query API (`query`, `query_range`) with Prometheus' own
        `timeout`, errors as values; none is sent before the time a Retry-After named."""
        waiting = self._backoff.waiting()
        if waiting is not None:
            return Answer(error=waiting)
        connection = self._connection()
        client = connection.client
        try:
            response = connection.session.get(
                f"{client.url}/api/v1/{endpoint}",
                params={**params, "timeout": f"{self.settings.timeout_seconds:g}"},
                headers=client.headers,
                auth=client.auth,
                timeout=self.http_timeout,
                # Per request, not only on the session: requests lets REQUESTS_CA_BUNDLE /
                # CURL_CA_BUNDLE (set in many images) replace a session's CA file and even
                # turn verification back on (psf/requests#3829).
                verify=connection.session.verify,
                stream=True,  # read by read_body, within the query's time
                # Prometheus' API does not redirect; an auth proxy in front of it does (to
                # its login page), and a failure there read "cannot reach Prometheus".
                allow_redirects=False,
            )
            with response:
                body = read_body(response, self.http_timeout, self._max_bytes)
            if response.is_redirect:
                return Answer(error=redirected(response.status_code, response.headers))
            if response.status_code != 200:
                self._retry_after(response)
                return Answer(error=error_detail(response.status_code, response.reason, body))
            if not body.startswith(_SUCCESS_HEAD):  # rare: parsed in full to say what it is
                failed = _not_success(_parsed(response, body))
                if failed is not None:
                    return Answer(error=failed)
            warnings = _warnings(body)
        except requests.RequestException as exc:
            return Answer(error=self._failure(exc))
        except _NotJsonError as exc:
            return Answer(error=str(exc))
        except (KeyError, TypeError, ValueError) as exc:
            return Answer(error=f"not a Prometheus query answer: {exc}")
        return Answer(body=body, warnings=warnings, ahead=_clock_ahead(response))

    def _retry_after(self, response: requests.Response) -> None:
        """Keep a 429's or a 503's Retry-After: nothing is asked before then, and its signals
        read as stale meanwhile. Said once when the back-off begins; a malformed value is
        ignored (asked again next tick, as without one), said once an hour."""
        value = response.headers.get("Retry-After")
        if response.status_code not in RETRY_STATUSES or value is None:
            return
        try:
            held = self._backoff.hold(
                response.status_code, value, time.time(), f"Prometheus at {self.url}"
            )
        except MalformedRetryAfterError as exc:
            self._note_malformed(value, exc)
            return
        if held is not None:
            self._note_held(response.status_code, held)

    def _note_held(self, status: int, held: Held) -> None:
        capped = (
            f" (capped at {format_duration(held.seconds)} from {held.asked:.0f} s)"
            if held.asked is not None
            else ""
        )
        structlog.get_logger("governor.signals").warning(
            "prometheus.retry_after",
            url=self.url,
            status=status,
            seconds=round(held.seconds),
            detail=f"Prometheus (or a proxy in front of it) answered HTTP {status} with "
            f"Retry-After: no query to it for {held.seconds:.0f} s{capped}; its signals read "
            "as stale meanwhile (each policy's on_stale decides)",
        )

    def _note_malformed(self, value: str, exc: MalformedRetryAfterError) -> None:
        wall = time.monotonic()
        if self._malformed_noted is not None and wall - self._malformed_noted < 3600.0:
            return
        self._malformed_noted = wall
        structlog.get_logger("governor.signals").warning(
            "prometheus.retry_after_malformed",
            url=self.url,
            value=ascii(value[:64]),
            detail=f"{exc}: ignored, asked again next tick (Retry-After is whole seconds or "
            "an HTTP-date, RFC 9110; fix the proxy in front of Prometheus that sends it)",
        )

    def _failure(self, exc: requests.RequestException) -> str:
        """One line for a failed request: the root cause, not requests' nested repr."""
        if isinstance(exc, SlowAnswerError | CutShortError | TooLargeAnswerError):
            return str(exc)
        if isinstance(exc, requests.Timeout):
            return f"no answer within {self.http_timeout:g}s (timeout)"
        if isinstance(exc, requests.exceptions.SSLError):
            return f"TLS with Prometheus at {self.url} failed: {tls_cause(exc)}"
        if isinstance(exc, requests.ConnectionError):
            return f"cannot reach Prometheus at {self.url}: {connection_cause(exc)}"
        if isinstance(exc, requests.exceptions.InvalidHeader):  # its text quotes the header
            return (
                "a header sent to Prometheus is not a valid HTTP header (check "
                "GOVERNOR_PROMETHEUS__BEARER_TOKEN and __HEADERS; the value is not shown)"
            )
        return f"not a Prometheus query answer: {exc}"

    def check(self, now: float | None = None) -> None:
        """Raise SignalError unless Prometheus answers a trivial query."""
        answer = self.query("time()", time.time() if now is None else now)
        if answer.error is not None:
            raise SignalError(
                f"Prometheus at {self.url} does not answer: {answer.error}; "
                "check GOVERNOR_PROMETHEUS__URL, TLS and auth settings"
            )

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        with self._lock:
            for connection in self._connections:
                connection.session.close()
            self._connections.clear()

    def __enter__(self) -> PrometheusSource:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _connection(self) -> PrometheusConnection:
        connection: PrometheusConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = open_connection(self.settings, self._options)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _sample(
        self,
        key: SignalKey,
        answer: Answer,
        reads: Sequence[str],
        now: float,
        dropped: list[str] | None = None,
    ) -> Sample:
        if answer.error is not None:
            return self._unanswered(key, f"query {key.query!r} failed: {answer.error}")
        fresh = self._times.of(reads, now, absent_ok=key.absent_zero)
        if isinstance(fresh, str):
            return self._unanswered(key, f"query {key.query!r}: {fresh}")
        timestamp, note = fresh
        validity = Validity.PARTIAL if answer.warnings else Validity.OK
        detail = "; ".join(filter(None, [*answer.warnings, note]))
        try:
            sample = self._decode(key, answer, timestamp, validity, detail, dropped)
        except ResultShapeError as exc:
            return error_sample(key, f"query {key.query!r}: {exc}")
        except (AttributeError, KeyError, IndexError, TypeError, ValueError) as exc:
            return error_sample(key, f"query {key.query!r}: not a Prometheus result ({exc!r})")
        if sample.validity is not Validity.EMPTY:
            return sample
        return self._empty(key, sample, reads, timestamp)

    def _unanswered(self, key: SignalKey, detail: str) -> Sample:
        """A query without an answer: an error, or stale while Prometheus asked (Retry-After)
        not to be asked (its data is as old as the last answer, as when a scrape stops)."""
        waiting = self._backoff.waiting()
        if waiting is None:
            return error_sample(key, detail)
        why = f"query {key.query!r} {waiting} (its signals read as stale until then)"
        return error_sample(key, why, Validity.STALE)

    def _decode(
        self,
        key: SignalKey,
        answer: Answer,
        timestamp: float,
        validity: Validity,
        detail: str,
        dropped: list[str] | None,
    ) -> Sample:
        if key.by is None:
            return decode_scalar(answer.result, timestamp, validity, detail)
        fast = vector_from_body(answer.body, key.by, timestamp, validity, detail, dropped)
        if fast is not None:
            return fast
        return decode_vector(answer.result, key.by, timestamp, validity, detail, dropped)

    def _empty(self, key: SignalKey, sample: Sample, reads: Sequence[str], at: float) -> Sample:
        """What an answer without series means for this signal: not enough history yet (its
        look back reaches before Prometheus' data), zero (`absent: zero`), or EMPTY."""
        lacking = self._history.lacking(reads, key.history) if key.history else []
        if lacking:
            why = (
                f"not enough history yet: no sample of {', '.join(lacking)} from "
                f"{key.history:g} s ago (history:)"
            )
            return replace(sample, validity=Validity.NO_HISTORY, detail=why)
        if key.history:
            # Held before, empty now: Prometheus may have lost its data (restarted without
            # its volume). Asked again next fetch, so that from then on this reads as waiting
            # for history, not as a fault that pages for a day (nor, absent: zero, as 0).
            self._history.forget(reads, key.history)
            if not key.absent_zero:
                again = "whether Prometheus still holds its history is asked again"
                return replace(sample, detail="; ".join(filter(None, [sample.detail, again])))
        return absent_as_zero(key, sample, at)


def absent_as_zero(key: SignalKey, sample: Sample, at: float) -> Sample:
    """An answer without series for a signal with `absent: zero` (it counts events that
    may not have happened yet): 0, valid; any other signal's empty answer is kept EMPTY."""
    if not key.absent_zero or sample.validity is not Validity.EMPTY:
        return sample
    why = "no series: read as 0 (absent: zero)"
    if isinstance(sample, ScalarSample):
        return ScalarSample(0.0, at, Validity.OK, why)
    return replace(sample, validity=Validity.OK, detail=why)


def _reads(queries: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """The selectors each query reads; and, apart, why they cannot be told for a query that
    does not parse (it still runs: Prometheus' own error, if it has one, is the clearer)."""
    reads: dict[str, tuple[str, ...]] = {}
    unparsed: dict[str, str] = {}
    for query in queries:
        try:
            reads[query] = selectors(query)
        except QuerySyntaxError as exc:
            reads[query], unparsed[query] = (), str(exc)
    return reads, unparsed


def _untold_ages(samples: dict[SignalKey, Sample], unparsed: Mapping[str, str]) -> None:
    """An answer whose data's age cannot be told is not trusted: fail closed, as when an age
    query fails."""
    for key, sample in samples.items():
        if key.query in unparsed and sample.validity is not Validity.ERROR:
            samples[key] = error_sample(key, f"query {key.query!r} {unparsed[key.query]}")


def error_sample(key: SignalKey, detail: str, validity: Validity = Validity.ERROR) -> Sample:
    """The sample of a query that failed as a whole: no value for any label value (STALE:
    not asked, as Prometheus said to wait)."""
    if key.by is None:
        return ScalarSample(math.nan, math.nan, validity, detail)
    empty = np.empty(0, dtype=np.float64)
    return VectorSample(key.by, (), empty, empty.copy(), validity, detail)


def signal_errors(
    snapshot: Snapshot, users: Mapping[SignalKey, Sequence[str]]
) -> list[SignalError]:
    """A SignalError for each query that failed as a whole, naming the policies that use it."""
    errors = []
    for key, sample in snapshot.samples.items():
        if sample.validity is Validity.ERROR:
            policies = ", ".join(users.get(key, ())) or "no policy"
            errors.append(SignalError(f"{sample.detail} (used by {policies})"))
    return errors
