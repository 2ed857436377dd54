"""A real Prometheus behind a proxy that spoils some answers (a misconfigured gateway, a
broken remote backend): whatever it sends back to the age or history queries, `fetch` never
raises, the signals reading the spoiled selector are errors naming it and the cause, and
the others are read as usual."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from controller.model import SignalKey, Validity
from controller.signals import PrometheusSource
from tests.support.prometheus import PrometheusServer

pytestmark = pytest.mark.integration

SPOILED = "gpu_util"  # the selector whose age (or history) answers are replaced
AGE, HISTORY = f"max(timestamp({SPOILED}))", f"last_over_time({SPOILED}["
GPU, QUEUES = SignalKey("avg(gpu_util)"), SignalKey("sum by (tenant) (queue_depth)", "tenant")


class SpoilingProxy:
    """Forwards every request to Prometheus; answers the queries holding `marker` (the age
    or the history query of SPOILED) with `body` instead, status 200."""

    def __init__(self, upstream: str) -> None:
        self.upstream, self.body, self.marker = upstream, b"", AGE
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                text = query.get("query", [""])[0]
                if proxy.marker in text:
                    status, body = 200, proxy.body
                else:
                    with urllib.request.urlopen(proxy.upstream + self.path, timeout=10) as r:
                        status, body = r.status, r.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def proxy(history_prometheus: PrometheusServer) -> Iterator[SpoilingProxy]:
    spoiling = SpoilingProxy(history_prometheus.url)
    yield spoiling
    spoiling.close()


def _vector(value: object, metric: object = None) -> bytes:
    series = {"metric": {} if metric is None else metric, "value": [0, value]}
    result = {"resultType": "vector", "result": [series]}
    return json.dumps({"status": "success", "data": result}).encode()


SPOILED_ANSWERS = {
    "no data": b'{"status":"success"}',
    "text value": _vector("soon"),
    "no value": json.dumps(
        {"status": "success", "data": {"resultType": "vector", "result": [{"metric": {}}]}}
    ).encode(),
    "a scalar": json.dumps(
        {"status": "success", "data": {"resultType": "scalar", "result": [0, "1"]}}
    ).encode(),
    "+Inf": _vector("+Inf"),
    "-Inf": _vector("-Inf"),
    "a year ahead": _vector("TOMORROW"),  # replaced by now + a year below
}


@pytest.mark.parametrize("name", SPOILED_ANSWERS)
def test_a_spoiled_age_answer_is_an_error_of_its_signals_only(
    proxy: SpoilingProxy, now: float, name: str
) -> None:
    body = SPOILED_ANSWERS[name]
    if name == "a year ahead":  # a newest sample after the evaluation time: fresh forever
        body = _vector(str(now + 365 * 86400))
    proxy.body, proxy.marker = body, AGE
    with PrometheusSource.from_url(proxy.url, sample_age_refresh_seconds=0.0) as source:
        snapshot = source.fetch([GPU, QUEUES], now)  # raised KeyError, ValueError, ...

    gpu = snapshot.samples[GPU]
    assert gpu.validity is Validity.ERROR
    assert gpu.detail.startswith(f"query 'avg(gpu_util)': cannot tell the age of {SPOILED}: ")
    assert "not a Prometheus answer to the age query" in gpu.detail
    assert snapshot.samples[QUEUES].validity is Validity.OK


def test_a_spoiled_history_answer_is_no_history_yet_never_a_failed_fetch(
    proxy: SpoilingProxy, now: float
) -> None:
    proxy.body, proxy.marker = b'{"status":"success"}', HISTORY
    key = SignalKey("avg(gpu_util offset 1d) and on() vector(0) == 1", history=86400.0)
    with PrometheusSource.from_url(proxy.url, sample_age_refresh_seconds=0.0) as source:
        snapshot = source.fetch([key, QUEUES], now)  # raised KeyError: 'data'

    # A spoiled probe proves nothing: an empty answer is "not enough history yet".
    assert snapshot.samples[key].validity is Validity.NO_HISTORY
    assert snapshot.samples[QUEUES].validity is Validity.OK


def test_a_vector_whose_series_labels_are_no_mapping_is_an_error_naming_the_query(
    proxy: SpoilingProxy, now: float
) -> None:
    proxy.body, proxy.marker = _vector("1", metric=[1]), QUEUES.query
    with PrometheusSource.from_url(proxy.url, sample_age_refresh_seconds=0.0) as source:
        snapshot = source.fetch([GPU, QUEUES], now)  # raised AttributeError

    queues = snapshot.samples[QUEUES]
    assert queues.validity is Validity.ERROR
    assert queues.detail.startswith(f"query {QUEUES.query!r}: not a Prometheus result")
    assert snapshot.samples[GPU].validity is Validity.OK
