"""The per-tenant in-flight gauge a FairShare's demand reads: up at admission, down at settle
or release (the real gateway, Redis and fake upstream)."""

from __future__ import annotations

import re

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
