"""The nginx module's /metrics against `governor gateway`'s: after the same requests (the parity
sequence: allowed, refused every way, streamed, degraded, charged), the same counts under the
same names and labels — the series the shipped policies read (gateway_requests_total,
gateway_cost_usd_total) — and a scrape token honoured as the Python gateway honours it."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from controller.policy.documents import ThrottlePolicy
from controller.policy.loader import load_directory
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.nginx.conftest import Side
from tests.nginx.nginx_server import REPO, NginxServer
from tests.nginx.test_parity import CALLERS, prepare, run, sequence
from tests.support.prometheus import PrometheusServer, prometheus_config

pytestmark = pytest.mark.integration

COMPARED = ("gateway_requests", "gateway_tokens", "gateway_cost_usd",
            "gateway_requests_in_flight")  # fmt: skip
Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = None) -> httpx.Response:
    headers = {} if token is None else {"authorization": f"Bearer {token}"}
    return httpx.get(f"{url}/metrics", headers=headers, timeout=10.0)


def series(text: str) -> Series:
    """Every sample of the compared families (a counter's `_total` sample, a gauge's own), by
    name and labels."""
    found: defaultdict[tuple[str, tuple[tuple[str, str], ...]], float] = defaultdict(float)
    for family in text_string_to_metric_families(text):
        if family.name not in COMPARED:
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") or family.type == "gauge":
                found[sample.name, tuple(sorted(sample.labels.items()))] += sample.value
    return dict(found)


def delta(after: Series, before: Series) -> Series:
    return {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)}


def test_nginx_counts_what_the_python_gateway_counts(
    nginx: Side, python_gateway: Side, upstream: tuple[FakeUpstream, ServerThread]
) -> None:
    fake = upstream[0]
    keys = {side.name: prepare(side) for side in (python_gateway, nginx)}
    before = series(scrape(nginx.url).text)  # the session's nginx counted earlier tests too
    for step in sequence():
        run(python_gateway, keys["python"], step, fake)
        run(nginx, keys["nginx"], step, fake)
    python = series(scrape(python_gateway.url).text)
    lua = delta(series(scrape(nginx.url).text), before)

    def rounded(found: Series) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return {k: round(v, 9) for k, v in found.items() if v}

    assert rounded(lua) == rounded(python)  # nothing left in flight in either, too
    # The comparison covers what the policies read: every caller's traffic and its outcomes.
    outcomes = {
        dict(labels)["outcome"] for name, labels in python if name == "gateway_requests_total"
    }
    assert {"allow", "degraded", "unauthenticated", "model_not_allowed", "unknown_plan",
            "rate_limited", "budget_exhausted", "bad_request"} <= outcomes  # fmt: skip
    tenants = {dict(labels)["tenant"] for _name, labels in python}
    assert {tenant for tenant, _plan in CALLERS.values()} <= tenants
    cost = sum(v for (name, _labels), v in lua.items() if name == "gateway_cost_usd_total")
    assert cost > 0
    assert math.isfinite(cost)


def test_a_scrape_token_guards_the_series_as_in_the_python_gateway(
    tmp_path: Path, export_dir: Path, upstream: tuple[FakeUpstream, ServerThread],
    nginx_session: NginxServer,
) -> None:  # fmt: skip
    env = {**nginx_session.env, "GOVERNOR_GATEWAY__METRICS_TOKEN": "s3cret-scrape"}
    server = NginxServer(tmp_path, export_dir, upstream[1].port, env).start()
    try:
        refused = scrape(server.url)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="metrics"'
        assert "s3cret" not in refused.text
        assert scrape(server.url, "s3cret-scrapX").status_code == 401
        assert scrape(server.url, "s3cret-scrape-and-more").status_code == 401
        for odd in (b"Bearer s3cret-scrape\xa0", b"Bearer s3cret-scrape\x85"):
            assert (
                httpx.get(f"{server.url}/metrics", headers={b"authorization": odd}).status_code
                == 401
            )
        tab = httpx.get(f"{server.url}/metrics", headers={"authorization": "Bearer  s3cret-scrape"})
        assert tab.status_code == 200  # spaces around it are trimmed, as around a key
        allowed = scrape(server.url, "s3cret-scrape")
        assert allowed.status_code == 200
        assert allowed.headers["content-type"].startswith("text/plain; version=0.0.4")
        families = {f.name for f in text_string_to_metric_families(allowed.text)}
        assert {"gateway_requests", "gateway_cost_usd", "gateway_store_calls_lost"} <= families
    finally:
        server.stop()


def shipped_query(policy: str, signal: str) -> str:
    loaded = load_directory(REPO / "policies")
    (found,) = [p for p in loaded.controllers if p.metadata.name == policy]
    assert isinstance(found, ThrottlePolicy)
    return found.spec.signals[signal].query


def test_the_shipped_cost_policy_sees_a_tenants_spend_through_nginx(
    tmp_path: Path, nginx: Side, nginx_session: NginxServer
) -> None:
    """A real Prometheus scraping nginx: the shipped tenant-cost-anomaly's spend query (it
    throttles a runaway by what it costs) reads the tenant's spend, as from `governor gateway`."""
    query = shipped_query("tenant-cost-anomaly", "spend")
    prometheus = PrometheusServer(
        tmp_path / "prometheus", prometheus_config([f"127.0.0.1:{nginx_session.port}"])
    ).start()
    key = nginx.key("spender", "paid")
    try:
        spend: list[dict[str, Any]] = []
        deadline = time.monotonic() + 30.0
        while not spend and time.monotonic() < deadline:
            assert nginx.chat(key).status_code == 200
            time.sleep(0.3)
            found = prometheus.query(query, time.time())
            spend = [s for s in found if s["metric"].get("tenant") == "spender"]
        assert spend, f"no spend of the tenant in {query!r} within 30 s"
        assert float(spend[0]["value"][1]) > 0
    finally:
        prometheus.stop()


def allowed(text: str, tenant: str) -> float:
    return sum(
        value
        for (name, labels), value in series(text).items()
        if name == "gateway_requests_total"
        and dict(labels)["tenant"] == tenant
        and dict(labels)["outcome"] == "allow"
    )


def dropped(text: str) -> float:
    (family,) = [f for f in text_string_to_metric_families(text)
                 if f.name == "gateway_metrics_dropped"]  # fmt: skip
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


def test_a_full_metrics_dict_counts_its_drops_and_never_resets_a_counter(
    tmp_path: Path, nginx: Side, nginx_session: NginxServer,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:  # fmt: skip
    """The dict's smallest size, then tenant after tenant: new series stop fitting, their
    increments are counted as dropped, and a series that fitted keeps counting from where it
    was (evicting it to make room would read as a counter reset, its spend lost)."""
    server = NginxServer(
        tmp_path, nginx_session.export_dir, upstream[1].port, nginx_session.env,
        metrics_dict="lua_shared_dict governor_metrics 12k;",
    ).start()  # fmt: skip
    side = Side("small", server.url, nginx.db, nginx.http)
    try:
        steady = side.key("steady", "paid")
        assert side.chat(steady).status_code == 200
        assert allowed(scrape(server.url).text, "steady") == 1
        for n in range(300):
            assert side.chat(side.key(f"crowd{n}", "paid")).status_code == 200
            if n % 10 == 9 and dropped(scrape(server.url).text) > 0:
                break
        assert dropped(scrape(server.url).text) > 0, "300 tenants fitted in 12k"
        assert side.chat(steady).status_code == 200
        assert allowed(scrape(server.url).text, "steady") == 2
        assert server.problems() == []
    finally:
        server.stop()


def test_without_the_dict_requests_are_served_and_metrics_say_what_is_missing(
    tmp_path: Path, nginx: Side, nginx_session: NginxServer,
    upstream: tuple[FakeUpstream, ServerThread],
) -> None:  # fmt: skip
    server = NginxServer(
        tmp_path, nginx_session.export_dir, upstream[1].port, nginx_session.env, metrics_dict=""
    ).start()
    side = Side("bare", server.url, nginx.db, nginx.http)
    try:
        assert side.chat(side.key("plain", "paid")).status_code == 200
        answer = scrape(server.url)
        assert answer.status_code == 503
        assert "lua_shared_dict governor_metrics" in answer.text
        assert "/metrics is off" in server.error_log.read_text()
        assert server.problems() == []
    finally:
        server.stop()
