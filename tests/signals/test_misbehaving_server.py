"""A server that follows Prometheus' HTTP API but misbehaves as a real Prometheus does not (a
proxy, a load balancer, a broken remote backend): HTTP 200 with `status: error`, a body
cut short when the connection closes, a body trickling in. Each query is an error naming
it and the cause, never a value, and a fetch takes no longer than the query timeout allows."""

from __future__ import annotations

import email.utils
import json
import threading
import time
import tracemalloc
import urllib.parse
from collections.abc import Iterator, MutableMapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import structlog

from controller.errors import SignalError
from controller.model import Sample, SignalKey, Validity, VectorSample
from controller.signals import PrometheusSource
from controller.sim.backtest import Matrix, range_query
from tests.support.prometheus import PrometheusServer
from tests.support.redis import free_port

pytestmark = pytest.mark.integration

QUEUES = SignalKey("sum by (tenant) (queue_depth)", "tenant")
TENANTS = 5


def _answer(now: float, status: str = "success", **extra: object) -> bytes:
    """A vector of TENANTS series, as Prometheus writes it (compact, `status` first)."""
    series = [{"metric": {"tenant": f"t{i}"}, "value": [now, str(i)]} for i in range(TENANTS)]
    body = {"status": status, "data": {"resultType": "vector", "result": series}, **extra}
    return json.dumps(body, separators=(",", ":")).encode()


def _matrix(now: float) -> bytes:
    """A range query's answer: TENANTS series of two points each."""
    points = [[now - 15, "0"], [now, "1"]]
    series = [{"metric": {"tenant": f"t{i}"}, "values": points} for i in range(TENANTS)]
    body = {"status": "success", "data": {"resultType": "matrix", "result": series}}
    return json.dumps(body, separators=(",", ":")).encode()


def _histograms(now: float) -> bytes:
    """A vector of one classic series and one native histogram (Prometheus' API format)."""
    native = {"count": "10", "sum": "3.1", "buckets": [[0, "0.5", "1", "10"]]}
    series = [
        {"metric": {"tenant": "t0"}, "value": [now, "1"]},
        {"metric": {"tenant": "t1"}, "histogram": [now, native]},
    ]
    data = {"resultType": "vector", "result": series}
    return json.dumps({"status": "success", "data": data}, separators=(",", ":")).encode()


_NOBODY = free_port()  # an auth proxy's sign-in host, down
# Thanos' or Cortex's query frontend over its limits (429), a proxy before a Prometheus
# that is not ready (503).
BUSY = {"too-many": 429, "unavailable": 503}


# nginx's own error page in front of Prometheus, and an auth proxy's login page.
PAGES = {
    "nginx-502": (
        502,
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
        b"</body>\r\n</html>\r\n",
    ),
    "login": (200, b"<!DOCTYPE html>\n<html><head><title>Sign in\x1b[2J</title></head></html>\n"),
}


class _Handler(BaseHTTPRequestHandler):
    """Answers the age queries truthfully (a sample from now) and the signal query as the
    server's `mode` says."""

    protocol_version = "HTTP/1.0"  # a body may end with the connection
    server: Misbehaving

    def log_message(self, *args: object) -> None:
        pass

    def date_time_string(self, timestamp: float | None = None) -> str:
        """The Date header, on a clock `server.ahead` seconds ahead."""
        return super().date_time_string(time.time() + self.server.ahead)

    def do_GET(self) -> None:
        now = time.time()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        mode = self.server.mode
        self.server.requests += 1
        if mode in BUSY:  # a proxy shedding load refuses every query, the age queries too
            self._busy(BUSY[mode])
        elif query["query"][0].startswith("max(timestamp("):
            newest = [{"metric": {}, "value": [now, str(now)]}]
            data = {"resultType": "vector", "result": newest}
            self._send(json.dumps({"status": "success", "data": data}).encode())
        elif mode in PAGES:
            status, page = PAGES[mode]
            self._send(page, status=status, content_type="text/html")
        else:
            getattr(self, "_" + mode.replace("-", "_"))(now)

    def _busy(self, status: int) -> None:
        """Prometheus' error body, with the server's Retry-After if it has one."""
        body = json.dumps({"status": "error", "errorType": "unavailable", "error": "busy"})
        self.send_response(status)
        if self.server.retry_after is not None:
            self.send_header("Retry-After", self.server.retry_after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())

    def _ok(self, now: float) -> None:
        ranged = self.path.startswith("/api/v1/query_range")
        self._send(_matrix(now) if ranged else _answer(now))

    def _instant_vector(self, now: float) -> None:
        self._send(_answer(now))

    def _error_200(self, now: float) -> None:
        self._send(_answer(now, "error", errorType="execution", error="boom"))

    def _cut(self, now: float) -> None:
        whole = _answer(now)
        self._send(whole[: whole.index(b',{"metric":{"tenant":"t3"')], length=False)

    def _sso(self, now: float) -> None:
        self.send_response(302)
        self.send_header("Location", f"http://127.0.0.1:{_NOBODY}/oauth2/start?rd=%2F&s=x")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _bad_gzip(self, now: float) -> None:
        self.send_response(200)
        self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(_answer(now))))
        self.end_headers()
        self.wfile.write(_answer(now))  # not gzip at all

    def _vm_partial(self, now: float) -> None:
        whole = _answer(now)
        self._send(whole.replace(b'"success",', b'"success","isPartial":true,', 1))

    def _histogram(self, now: float) -> None:
        self._send(_histograms(now))

    def _send(
        self,
        body: bytes,
        length: bool = True,
        status: int = 200,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        if length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _endless(self, now: float) -> None:
        """A vector whose series never end (a proxy in a loop), as fast as the socket takes
        them, until the client hangs up."""
        self.send_response(200)
        self.end_headers()
        series = b',{"metric":{"tenant":"t"},"value":[%.3f,"1"]}' % now
        try:
            self.wfile.write(b'{"status":"success","data":{"resultType":"vector","result":[')
            self.wfile.write(series[1:])
            while True:
                self.wfile.write(series * 10_000)
        except OSError:  # the client gave up: what it should do
            pass

    def _trickle(self, now: float) -> None:
        body = _answer(now)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:  # the client gave up: what it should do
            pass


class Misbehaving(ThreadingHTTPServer):
    """The signal query answered as `mode` says: "ok", "error-200", "cut" (the connection
    closes between two series, no Content-Length, as HTTP/1.0 allows) or "trickle" (a byte
    every 0.2 s)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "ok"
        self.ahead = 0.0  # how far the server's clock is ahead (its Date header)
        self.retry_after: str | None = None  # the Retry-After of a BUSY mode's answers
        self.requests = 0  # every query asked of it
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def server() -> Iterator[Misbehaving]:
    misbehaving = Misbehaving()
    yield misbehaving
    misbehaving.close()


def _fetch(server: Misbehaving, mode: str, **settings: float) -> tuple[Sample, float]:
    server.mode = mode
    started = time.monotonic()
    with PrometheusSource.from_url(server.url, sample_age_refresh_seconds=0.0, **settings) as src:
        sample = src.fetch([QUEUES], time.time()).samples[QUEUES]
    return sample, time.monotonic() - started


def test_the_server_answers_a_whole_vector_when_it_behaves(server: Misbehaving) -> None:
    sample, _ = _fetch(server, "ok")
    assert sample.validity is Validity.OK
    assert isinstance(sample, VectorSample)
    assert len(sample.keys) == TENANTS


def test_http_200_with_status_error_is_an_error_not_its_data(server: Misbehaving) -> None:
    """A proxy's HTTP 200 with `status: error` and a `data` part was read as valid data."""
    sample, _ = _fetch(server, "error-200")
    assert sample.validity is Validity.ERROR  # was OK, with five tenants
    assert sample.detail == (
        f"query {QUEUES.query!r} failed: answered status 'error' with HTTP 200 (execution: boom)"
    )


def test_a_body_cut_short_between_two_series_is_an_error_not_a_shorter_vector(
    server: Misbehaving,
) -> None:
    """A connection closed after three of five series (no Content-Length, so HTTP cannot
    tell) scanned as a vector of three tenants, valid; the other two went MISSING."""
    sample, _ = _fetch(server, "cut")
    assert sample.validity is Validity.ERROR  # was OK with t0, t1, t2
    assert sample.detail.startswith(f"query {QUEUES.query!r}: not a Prometheus result")


def test_a_trickling_body_is_given_up_on_within_the_query_timeout(server: Misbehaving) -> None:
    """requests' timeout bounds each socket read, not the answer: a body arriving a byte per
    0.2 s held the worker for its whole length (~70 s here), and closing the source waited
    for it. Now the answer is given up after the HTTP timeout (1 + 1 s)."""
    sample, took = _fetch(server, "trickle", timeout_seconds=1.0)
    assert sample.validity is Validity.ERROR
    assert "the answer was still arriving after 2s" in sample.detail
    assert took < 6.0  # fetch and close; was 4 s for the fetch, then ~70 s to close


def test_an_html_error_page_is_named_on_one_printable_line(server: Misbehaving) -> None:
    """nginx's 502 page was quoted with its line breaks: /readyz, one reason per line,
    showed it as five reasons."""
    sample, _ = _fetch(server, "nginx-502")
    assert sample.validity is Validity.ERROR
    assert sample.detail == (
        f"query {QUEUES.query!r} failed: HTTP 502: <html> <head><title>502 Bad Gateway</title>"
        "</head> <body> <center><h1>502 Bad Gateway</h1></center> <hr><center>nginx</center> "
        "</body> </html>"
    )


def test_a_login_page_with_http_200_says_what_came_instead_of_json(server: Misbehaving) -> None:
    """An auth proxy's login page (HTTP 200) was `not a Prometheus query answer: unexpected
    character: line 1 column 1 (char 0)`: nothing said that a web page had come back."""
    sample, _ = _fetch(server, "login")
    assert sample.validity is Validity.ERROR
    assert sample.detail == (
        f"query {QUEUES.query!r} failed: answered HTTP 200 with text/html, not Prometheus' "
        "JSON: <!DOCTYPE html> <html><head><title>Sign in [2J</title></head></html>"
    )


def test_an_endless_answer_is_cut_off_at_its_size_limit(server: Misbehaving) -> None:
    """An answer was read for as long as it kept coming: with no end, the HTTP timeout
    alone (6 s by default) bounded it, gigabytes at loopback speed."""
    tracemalloc.start()
    try:
        sample, took = _fetch(server, "endless", timeout_seconds=30.0, max_answer_megabytes=5.0)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sample.validity is Validity.ERROR
    assert sample.detail == (
        f"query {QUEUES.query!r} failed: the answer is longer than 5 MB "
        "(GOVERNOR_PROMETHEUS__MAX_ANSWER_MEGABYTES): not read further"
    )
    assert took < 10.0  # was the whole 31 s
    assert peak < 50e6


def test_native_histograms_are_an_error_that_says_how_to_read_a_number(
    server: Misbehaving,
) -> None:
    """A series holding a native histogram (`histogram` where a number's `value` is) was
    `not a Prometheus result (KeyError('value'))`: true, and no help."""
    sample, _ = _fetch(server, "histogram")
    assert sample.validity is Validity.ERROR
    assert sample.detail.startswith(
        f"query {QUEUES.query!r}: query returns native histograms, not numbers; read one "
        "number from each with histogram_quantile(...)"
    )


def test_a_redirect_to_a_sign_in_page_is_named_not_followed(server: Misbehaving) -> None:
    """An auth proxy's redirect to its sign-in host was followed, and that host being down
    read `cannot reach Prometheus at <the Prometheus URL>: Connection refused`, which sent
    the operator to a Prometheus that had answered."""
    sample, _ = _fetch(server, "sso")
    assert sample.validity is Validity.ERROR
    assert sample.detail == (
        f"query {QUEUES.query!r} failed: HTTP 302 redirect to "
        f"http://127.0.0.1:{_NOBODY}/oauth2/start, not followed: Prometheus' API does not "
        "redirect (an auth proxy in front of it? check GOVERNOR_PROMETHEUS__URL and its "
        "credentials)"
    )


def test_a_body_that_is_not_what_its_content_encoding_says_is_named(server: Misbehaving) -> None:
    sample, _ = _fetch(server, "bad-gzip")
    assert sample.validity is Validity.ERROR
    assert sample.detail == (
        f"query {QUEUES.query!r} failed: the answer's body does not decode as its "
        "Content-Encoding 'gzip' says"
    )


def test_a_prometheus_clock_ahead_of_ours_is_warned_about(
    server: Misbehaving, history_prometheus: PrometheusServer
) -> None:
    """Queries are evaluated at this host's time: with Prometheus' clock 2 minutes ahead,
    every answer was as of 2 minutes in its past, every sample age looked fresh, and nothing
    said so. The Date of its answers shows it (a real Prometheus on our clock: no warning)."""
    with structlog.testing.capture_logs() as logs:
        with PrometheusSource.from_url(history_prometheus.url) as source:
            source.fetch([QUEUES], time.time())
        assert [e for e in logs if e["event"] == "prometheus.clock_ahead"] == []
        server.ahead = 120.0
        with PrometheusSource.from_url(server.url) as source:
            for _ in range(3):  # warned once, not every tick
                source.fetch([QUEUES], time.time())
    [warned] = [e for e in logs if e["event"] == "prometheus.clock_ahead"]
    assert warned["seconds"] in (119, 120)
    assert "every signal is that much older than its age says" in warned["detail"]


def test_a_victoriametrics_partial_answer_is_partial_not_ok(server: Misbehaving) -> None:
    """VictoriaMetrics says an answer lacks some storage nodes' data with `isPartial: true`,
    no warning: it was read as whole (OK), the tenants on the missing nodes MISSING."""
    sample, _ = _fetch(server, "vm-partial")
    assert sample.validity is Validity.PARTIAL  # was OK
    assert sample.detail.startswith("isPartial: some of the data was unavailable")


# --- Retry-After: a server shedding load says when to ask again ------------------------------


def _source(server: Misbehaving) -> PrometheusSource:
    return PrometheusSource.from_url(server.url, sample_age_refresh_seconds=0.0)


def _said(logs: Sequence[MutableMapping[str, Any]], event: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == event]


@pytest.mark.parametrize("mode", BUSY)
def test_retry_after_seconds_are_honoured_and_the_signals_read_as_stale(
    server: Misbehaving, mode: str
) -> None:
    """A 429 or a 503 with Retry-After was asked again on the next tick regardless: a query
    frontend shedding load got every replica's queries back every few seconds. Now nothing is
    asked of it before the time it names, its signals read as stale meanwhile (so each
    policy's on_stale decides, as for any stale signal), and one line says so."""
    server.mode, server.retry_after = mode, "2"
    with structlog.testing.capture_logs() as logs, _source(server) as source:
        refused = source.fetch([QUEUES], time.time()).samples[QUEUES]
        asked, refused_at = server.requests, time.time()
        held = [source.fetch([QUEUES], time.time()).samples[QUEUES] for _ in range(3)]
        assert server.requests == asked  # was asked again at once, every fetch
        server.mode = "ok"
        time.sleep(max(refused_at + 2.1 - time.time(), 0.0))
        back = source.fetch([QUEUES], time.time()).samples[QUEUES]
    assert server.requests > asked
    assert back.validity is Validity.OK
    assert [s.validity for s in (refused, *held)] == [Validity.STALE] * 4  # was ERROR
    assert held[0].detail.startswith(f"query {QUEUES.query!r} not asked until ")
    assert held[0].detail.endswith(
        f": Prometheus at {server.url} answered HTTP {BUSY[mode]} with Retry-After: 2 "
        "(its signals read as stale until then)"
    )
    [said] = _said(logs, "prometheus.retry_after")  # once, not once per query or fetch
    assert (said["status"], said["seconds"], said["url"]) == (BUSY[mode], 2, server.url)


def test_retry_after_as_an_http_date_is_honoured(server: Misbehaving) -> None:
    server.mode = "unavailable"
    server.retry_after = email.utils.formatdate(time.time() + 4, usegmt=True)
    with structlog.testing.capture_logs() as logs, _source(server) as source:
        source.fetch([QUEUES], time.time())
        asked = server.requests
        sample = source.fetch([QUEUES], time.time()).samples[QUEUES]
    assert server.requests == asked
    assert sample.validity is Validity.STALE
    [said] = _said(logs, "prometheus.retry_after")
    assert 2 <= said["seconds"] <= 4  # the date is in whole seconds


def test_a_retry_after_beyond_five_minutes_is_capped(server: Misbehaving) -> None:
    """A day (a misconfigured proxy) would have kept every policy on its fallback all day."""
    server.mode, server.retry_after = "too-many", "86400"
    with structlog.testing.capture_logs() as logs, _source(server) as source:
        source.fetch([QUEUES], time.time())
        asked = server.requests
        sample = source.fetch([QUEUES], time.time()).samples[QUEUES]
    assert server.requests == asked
    assert sample.validity is Validity.STALE
    [said] = _said(logs, "prometheus.retry_after")
    assert said["seconds"] == 300
    assert "capped at 5m from 86400 s" in said["detail"]


@pytest.mark.parametrize("value", ["in a bit", "-5", "1.5", "Mon, 99 Foo 2026 25:61:00 GMT"])
def test_a_malformed_retry_after_is_ignored_with_a_warning(server: Misbehaving, value: str) -> None:
    server.mode, server.retry_after = "too-many", value
    with structlog.testing.capture_logs() as logs, _source(server) as source:
        samples, asked = [], []
        for _ in range(3):
            samples.append(source.fetch([QUEUES], time.time()).samples[QUEUES])
            asked.append(server.requests)
    assert asked[0] < asked[1] < asked[2]  # asked again each fetch, as without the header
    assert [s.validity for s in samples] == [Validity.ERROR] * 3
    assert samples[0].detail == f"query {QUEUES.query!r} failed: HTTP 429 unavailable: busy"
    [warned] = _said(logs, "prometheus.retry_after_malformed")  # once, not every fetch
    assert warned["value"] == ascii(value)
    assert "whole seconds or an HTTP-date" in warned["detail"]


# --- range queries (the backtest): the same guards ---------------------------------------------


def _range(server: Misbehaving, mode: str) -> Matrix:
    server.mode = mode
    now = time.time()
    with PrometheusSource.from_url(server.url, max_answer_megabytes=5.0) as source:
        return range_query(source, QUEUES.query, now - 15, now, 15)


def test_a_range_query_reads_a_matrix(server: Misbehaving) -> None:
    matrix = _range(server, "ok")
    assert sorted(len(series) for series in matrix.values()) == [TENANTS, TENANTS]


@pytest.mark.parametrize(
    "mode", ["error-200", "login", "sso", "bad-gzip", "nginx-502", "endless", "too-many"]
)
def test_a_range_query_fails_as_an_instant_query_does(server: Misbehaving, mode: str) -> None:
    """The backtest's range queries went through prometheus-api-client, without the instant
    queries' guards: a proxy's HTTP 200 with `status: error` was read as its `data`, an
    endless answer was read until memory ran out, a redirect to a sign-in page was followed,
    a web page said `Expecting value: line 1 column 1 (char 0)`. Now each fails with the
    words of the instant query."""
    sample, _ = _fetch(server, mode, max_answer_megabytes=5.0)
    prefix = f"query {QUEUES.query!r} failed: "
    assert sample.detail.startswith(prefix)
    with pytest.raises(SignalError) as raised:
        _range(server, mode)
    assert str(
        raised.value
    ) == f"range query {QUEUES.query!r} failed: " + sample.detail.removeprefix(prefix)


def test_a_range_answer_cut_short_is_an_error_not_a_shorter_matrix(server: Misbehaving) -> None:
    with pytest.raises(SignalError) as raised:
        _range(server, "cut")
    assert str(raised.value).startswith(
        f"range query {QUEUES.query!r} failed: not a Prometheus range answer ("
    )


def test_a_range_query_answered_with_an_instant_vector_is_an_error(server: Misbehaving) -> None:
    """A vector where a matrix belongs (a proxy rewriting the path) read as no data at all."""
    with pytest.raises(SignalError) as raised:
        _range(server, "instant-vector")
    assert str(raised.value) == (
        f"range query {QUEUES.query!r} failed: not a Prometheus range answer: resultType "
        "'vector', not 'matrix' (a proxy in front of Prometheus rewriting the path?)"
    )
