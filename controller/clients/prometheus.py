"""The Prometheus HTTP client: one prometheus-api-client connection per worker thread, with
auth, TLS and a retry policy a 5 s control loop can afford; failures as one line each."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
import urllib3
from prometheus_api_client import PrometheusConnect
from urllib3.util.retry import Retry

from controller.errors import ConfigurationError, untrusted_certificate_hint
from controller.settings import PrometheusSettings

# The library's default retries 3 times with back-off on 5xx: 6 s of waiting inside one tick,
# and again on a query that timed out. One immediate retry of a refused or reset connection
# (a pooled keep-alive socket closed by the server) is all a 5 s control loop can afford.
# A Retry-After is honoured by the signal source across ticks (clients/backoff.py), not by
# urllib3 within one: respected here, a 429 or 503 carrying one failed as "too many 429 error
# responses" instead of its status and body.
_RETRY = Retry(
    total=1,
    connect=1,
    read=False,
    status=0,
    other=0,
    redirect=0,
    backoff_factor=0,
    respect_retry_after_header=False,
)
# The root cause inside requests' long ConnectionError text, e.g. "Connection refused".
_OS_ERROR = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")
_TLS_REASON = re.compile(r"\[SSL[^\]]*\] ([^'\"(]+)")
# Read as it arrives, at most this much at a time, so the deadline is checked between reads.
_CHUNK_BYTES = 1 << 20


class SlowAnswerError(requests.Timeout):
    """An answer whose body did not arrive in full within the time a query is given."""


class TooLargeAnswerError(requests.RequestException):
    """An answer longer than GOVERNOR_PROMETHEUS__MAX_ANSWER_MEGABYTES."""


class CutShortError(requests.ConnectionError):
    """An answer whose body is not all there: the connection ended before the length its
    headers announced, or the body does not decode as they say."""


@dataclass
class PrometheusConnection:
    """One prometheus-api-client connection (one requests session) per worker thread. Its
    session (auth, headers, TLS, the retry policy) sends the queries; the answer bytes are
    read here, not by the library, so a 100k-series vector is never built as objects."""

    client: PrometheusConnect
    session: requests.Session


def client_options(settings: PrometheusSettings) -> dict[str, Any]:
    """Headers and auth for PrometheusConnect; secrets are unwrapped only here."""
    if settings.bearer_token is not None and settings.username is not None:
        raise ConfigurationError(
            "Prometheus: set either GOVERNOR_PROMETHEUS__BEARER_TOKEN or "
            "GOVERNOR_PROMETHEUS__USERNAME/PASSWORD, not both"
        )
    headers = dict(settings.headers)
    if settings.bearer_token is not None:
        headers["Authorization"] = f"Bearer {settings.bearer_token.get_secret_value()}"
    auth = None
    if settings.username is not None:
        password = settings.password.get_secret_value() if settings.password else ""
        auth = (settings.username, password)
    return {"headers": headers or None, "auth": auth}


def tls_cause(exc: requests.exceptions.SSLError) -> str:
    """The OpenSSL reason of a failed handshake, and the setting that fixes the usual one."""
    found = _TLS_REASON.search(str(exc))
    reason = found.group(1).strip() if found else type(exc).__name__
    if "certificate verify failed" in reason:
        reason += f" ({untrusted_certificate_hint('PROMETHEUS', 'its')})"
    return reason


def read_body(response: requests.Response, seconds: float, max_bytes: int) -> bytes:
    """The whole body of a response opened with `stream=True`, within `seconds` of now.

    requests' timeout bounds each read from the socket, not the answer: a body trickling in
    a byte at a time held a query worker for as long as the server kept sending (and
    `close()` waited for it). Raises SlowAnswerError past the deadline (after at most one
    more socket read), TooLargeAnswerError past `max_bytes` (decompressed: a gzip bomb
    counts at its size in memory), CutShortError when the connection ends early."""
    deadline = time.monotonic() + seconds
    chunks, size = [], 0
    try:
        while chunk := response.raw.read1(_CHUNK_BYTES, decode_content=True):
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise TooLargeAnswerError(
                    f"the answer is longer than {max_bytes / 1e6:g} MB "
                    "(GOVERNOR_PROMETHEUS__MAX_ANSWER_MEGABYTES): not read further"
                )
            if time.monotonic() > deadline:
                raise SlowAnswerError(
                    f"the answer was still arriving after {seconds:g}s "
                    f"({sum(map(len, chunks))} bytes so far)"
                )
    except urllib3.exceptions.DecodeError as exc:  # its Content-Encoding lied
        raise CutShortError(
            f"the answer's body does not decode as its Content-Encoding "
            f"{response.headers.get('Content-Encoding')!r} says"
        ) from exc
    except urllib3.exceptions.HTTPError as exc:  # IncompleteRead, a reset
        raise CutShortError(f"the answer was cut short: {type(exc).__name__}") from exc
    return b"".join(chunks)


def one_line(body: bytes, limit: int = 200) -> str:
    """The start of a body that is not Prometheus' JSON (a proxy's HTML error page) on one
    printable line: its line breaks became lines of their own in /readyz, which says one
    reason per line, and a control character reached an operator's terminal."""
    text = body[: limit * 4].decode("utf-8", "replace")
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text[:limit] + ("…" if len(text) > limit else "")


def error_detail(status: int, reason: str, body: bytes) -> str:
    """`HTTP 400 bad_data: parse error ...` from Prometheus' error body, if it sent one."""
    try:
        said = json.loads(body)
        return f"HTTP {status} {said['errorType']}: {one_line(str(said['error']).encode(), 1000)}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}: {one_line(body) or reason}"


def redirected(status: int, headers: Mapping[str, str]) -> str:
    """A redirect, not followed: where to (its query cut off: a login page's may carry a
    state or a token of its own)."""
    where = one_line(headers.get("Location", "").partition("?")[0].encode())
    return (
        f"HTTP {status} redirect to {where or 'nowhere'}, not followed: Prometheus' API does "
        "not redirect (an auth proxy in front of it? check GOVERNOR_PROMETHEUS__URL and its "
        "credentials)"
    )


def not_json(content_type: str | None, body: bytes) -> str:
    """What an HTTP 200 answer that is not JSON was (a login page of an auth proxy)."""
    kind = content_type or "no Content-Type"
    return f"answered HTTP 200 with {kind}, not Prometheus' JSON: {one_line(body) or 'empty'}"


def connection_cause(exc: requests.ConnectionError) -> str:
    """The root cause inside requests' long ConnectionError text, e.g. "Connection refused"."""
    reason = _OS_ERROR.search(str(exc))
    return reason.group(1) if reason else type(exc).__name__


def open_connection(settings: PrometheusSettings, options: dict[str, Any]) -> PrometheusConnection:
    """A new session and client for `settings` (`options` from `client_options`)."""
    session = requests.Session()
    ca_file = settings.ca_file
    session.verify = str(ca_file) if ca_file is not None else settings.verify_tls
    client = PrometheusConnect(
        url=settings.url.rstrip("/"),
        disable_ssl=not settings.verify_tls,
        retry=_RETRY,
        session=session,
        **options,
    )
    return PrometheusConnection(client, session)
