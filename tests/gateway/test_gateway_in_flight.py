"""The per-tenant in-flight gauge a FairShare's demand reads: up at admission, down at settle
or release, a background response's at the read that gives its slots back or its lease."""

from __future__ import annotations

import re

from controller.gateway.metrics import GatewayMetrics
from tests.gateway.conftest import Gateway
from tests.gateway.fake_upstream import FakeUpstream
from tests.gateway.test_gateway_streaming import data_lines, stream
from tests.support.prometheus import wait_for


def in_flight(gateway: Gateway, tenant: str) -> float | None:
    """The tenant's gauge (None: no series yet)."""
    found = re.search(
        rf'^gateway_requests_in_flight\{{model="gpt-3.5-turbo",plan="free",tenant="{tenant}"\}} '
        r"(\S+)$",
        gateway.metrics(),
        re.M,
    )
    return float(found.group(1)) if found else None


def test_a_held_stream_is_in_flight_until_it_ends(gateway: Gateway, held: FakeUpstream) -> None:
    key = gateway.key("acme", "free")
    with stream(gateway, key, hold="1") as answer:
        events = data_lines(answer.iter_lines())
        next(events)  # admitted and streaming
        assert in_flight(gateway, "acme") == 1.0
        assert in_flight(gateway, "other") is None  # only the tenant that has one open
        held.release.set()
        list(events)
    wait_for(lambda: in_flight(gateway, "acme") == 0.0, "the settled request left the gauge")


def test_a_refused_request_is_never_in_flight_and_a_failed_one_is_released(
    gateway: Gateway,
) -> None:
    key = gateway.key("acme", "free")
    failed = gateway.chat(key, headers={"x-fake-status": "500"})
    assert failed.status_code >= 500  # the upstream failed: released, never settled
    wait_for(lambda: in_flight(gateway, "acme") == 0.0, "the released request left the gauge")
    served = [gateway.chat(key).status_code for _ in range(12)]  # free: 10 a minute
    assert 429 in served
    assert in_flight(gateway, "acme") == 0.0


class Clock:
    """A monotonic clock the test moves (GatewayMetrics.clock): 600 s pass in no time."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def gauge(metrics: GatewayMetrics, tenant: str) -> float:
    value = metrics.registry.get_sample_value(
        "gateway_requests_in_flight", {"tenant": tenant, "plan": "free", "model": "gpt-4o"}
    )
    return -1.0 if value is None else value


def test_a_held_background_response_leaves_at_its_lease_once_and_never_below_0() -> None:
    """The gauge's held part (a background response whose answer ended, its slots held in
    Redis until read finished or its admission's lease ends; the read's path is in
    tests/nginx/test_responses_routes.py): in flight until the lease's end, seen at the next
    scrape; a read after it, or a second read, takes nothing more off."""
    clock = Clock()
    metrics = GatewayMetrics(10, 10)
    metrics.clock = clock
    for response in ("resp_a", "resp_b"):
        metrics.started("acme", "free", "gpt-4o")
        metrics.held("acme", "free", "gpt-4o", response, clock() + 600.0)
    assert gauge(metrics, "acme") == 2.0
    metrics.given_back("acme", "resp_a")
    metrics.given_back("acme", "resp_a")  # a second read: nothing twice
    metrics.given_back("globex", "resp_b")  # another tenant's id: not this one
    assert gauge(metrics, "acme") == 1.0
    clock.now += 599.0
    metrics.expire()
    assert gauge(metrics, "acme") == 1.0  # not a moment before its lease ends
    clock.now += 1.0
    metrics.expire()
    assert gauge(metrics, "acme") == 0.0
    metrics.given_back("acme", "resp_b")  # read after its lease: nothing more
    metrics.expire()
    assert gauge(metrics, "acme") == 0.0
    metrics.started("acme", "free", "gpt-4o")
    metrics.held("acme", "free", "gpt-4o", "resp_c", clock())  # its lease ended already
    assert gauge(metrics, "acme") == 0.0


def test_a_renewed_background_response_stays_until_its_renewed_lease_ends() -> None:
    """A read finding it still running renews its lease (GatewayMetrics.renewed): in flight
    past the admission's lease, until the renewal's ends; a renewal of one this process does
    not hold (another gateway's, or gone) adds nothing."""
    clock = Clock()
    metrics = GatewayMetrics(10, 10)
    metrics.clock = clock
    metrics.started("acme", "free", "gpt-4o")
    metrics.held("acme", "free", "gpt-4o", "resp_a", clock() + 600.0)
    clock.now += 599.0
    metrics.renewed("acme", "resp_a", 600.0)
    metrics.renewed("globex", "resp_a", 600.0)  # another tenant's id: nothing
    clock.now += 598.0
    metrics.expire()
    assert gauge(metrics, "acme") == 1.0  # 1,197 s after its admission
    clock.now += 2.0  # the renewal's lease ends
    metrics.expire()
    assert gauge(metrics, "acme") == 0.0
    metrics.renewed("acme", "resp_a", 600.0)  # gone already: not back
    metrics.expire()
    assert gauge(metrics, "acme") == 0.0
    assert gauge(metrics, "globex") == -1.0
