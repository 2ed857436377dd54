"""A spend jump of one tenant leads, through the whole loop, to a 429 for that tenant only:
the gateway counts the cost, Prometheus scrapes it, `governor run` sees the jump, engages the
policy and writes the tenant's limit, and the gateway enforces it from the next request.

The jumping tenant is known only through its API key (never `tenants set`): its plan comes
from the key, as the gateway's does. The time from the jump to the first 429 is measured and
printed with its parts (docs/operations.md, "From a spend jump to the first 429")."""

from __future__ import annotations

import itertools
import shutil
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.closed_loop.conftest import (
    CUT_SCALE,
    FOR_SECONDS,
    POLICY,
    SCRAPE_SECONDS,
    Loop,
)
from tests.daemon.harness import TICK_SECONDS, events
from tests.deploy.test_expositions import check_metrics
from tests.support.prometheus import wait_for

pytestmark = pytest.mark.integration

NORMAL = {"max_tokens": 5}  # about $0.0005 a request: far under the threshold
# 1000 completion tokens of gpt-4 is $0.06 a request; ten a second is $0.6/s.
HEAVY = {"max_tokens": 1000}
HEAVY_HEADERS = {"x-fake-tokens": "1000"}


@dataclass
class Client:
    """One tenant sending requests in a thread, every answer recorded with its time."""

    url: str
    key: str
    interval: float
    heavy_from: float | None = None  # monotonic time from which requests are expensive
    answers: list[tuple[float, int, bool]] = field(default_factory=list)  # (time, status, heavy)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with httpx.Client(timeout=10.0) as http:
            while not self.stop.is_set():
                heavy = self.heavy_from is not None and time.monotonic() >= self.heavy_from
                body: dict[str, Any] = {
                    "model": "gpt-4",
                    "messages": [{"role": "user", "content": "hi"}],
                    **(HEAVY if heavy else NORMAL),
                }
                headers = {"authorization": f"Bearer {self.key}"}
                if heavy:
                    headers |= HEAVY_HEADERS
                answer = http.post(f"{self.url}/v1/chat/completions", json=body, headers=headers)
                self.answers.append((time.monotonic(), answer.status_code, heavy))
                self.stop.wait(self.interval)

    def statuses(self) -> set[int]:
        return {status for _, status, _ in self.answers}


def test_a_spend_jump_gets_that_tenant_429_and_nobody_else(loop: Loop) -> None:
    clients = {
        "bigco": Client(loop.gateway_url, loop.keys["bigco"], 0.1),
        "acme": Client(loop.gateway_url, loop.keys["acme"], 0.5),
        "globex": Client(loop.gateway_url, loop.keys["globex"], 0.5),
    }
    threads = [threading.Thread(target=c.run, daemon=True) for c in clients.values()]
    for thread in threads:
        thread.start()
    try:
        # Normal traffic first: spend is seen, nothing engages.
        wait_for(
            lambda: bool(loop.prometheus.query("gateway_cost_usd_total", time.time())),
            "Prometheus holds the tenants' cost",
        )
        wait_for(lambda: all(len(c.answers) >= 6 for c in clients.values()), "normal traffic")
        assert events(loop.db, "policy.transition", policy=POLICY) == []
        jump_wall, jump = time.time(), time.monotonic()
        clients["bigco"].heavy_from = jump
        bigco = clients["bigco"]
        wait_for(lambda: 429 in bigco.statuses(), "bigco is answered 429", timeout=60.0)
        first_429 = next(t for t, status, _ in bigco.answers if status == 429)
        # The others keep being served for a while after the cut.
        after = len(clients["acme"].answers)
        wait_for(lambda: len(clients["acme"].answers) >= after + 6, "acme keeps sending")
    finally:
        for client in clients.values():
            client.stop.set()
        for thread in threads:
            thread.join(timeout=15)

    assert clients["acme"].statuses() == {200}
    assert clients["globex"].statuses() == {200}
    assert {s for _, s, heavy in bigco.answers if not heavy} == {200}
    [engaged] = [e for e in events(loop.db, "policy.transition", policy=POLICY)
                 if e["details"]["event"] == "engaged"]  # fmt: skip
    assert engaged["details"]["key"] == "bigco"
    [cut] = events(loop.db, "limit.changed", address="tenant/bigco/requests_per_minute")
    assert cut["new"] == 6000 * CUT_SCALE  # the key's plan (enterprise), not default_plan
    assert loop.daemon.metric("governor_engagements_unwritten_total", policy=POLICY) == 0.0

    # Both live expositions pass promtool's checks.
    controller = f"http://127.0.0.1:{loop.daemon.telemetry_port}/metrics"
    for url in (f"{loop.gateway_url}/metrics", controller):
        exposition = httpx.get(url).content
        assert b"_created" not in exposition
        assert check_metrics(_promtool(), exposition) == ""

    # The parts of the delay (wall-clock times from the journal; monotonic for the rest).
    total = first_429 - jump
    detected = engaged["at"] - FOR_SECONDS - jump_wall  # the condition first held
    written = cut["at"] - jump_wall
    heavy = [t for t, _, is_heavy in bigco.answers if is_heavy]
    gap = statistics.median(b - a for a, b in itertools.pairwise(heavy)) if len(heavy) > 2 else 0
    print(
        f"\nclosed loop: jump → first 429 {total:.2f} s; condition first true after "
        f"{detected:.2f} s (scrape {SCRAPE_SECONDS:g} s, rate window 5 s, tick {TICK_SECONDS:g} s)"
        f", engaged after for: {FOR_SECONDS:g} s at {engaged['at'] - jump_wall:.2f} s, limit "
        f"written at {written:.2f} s, first 429 {total - written:.2f} s later (the request in "
        f"flight and the next one, {gap:.2f} s apart: the gateway's limit cache is checked by "
        "version, none expires)"
    )
    assert written <= total  # the 429 came from the written limit, not before it


def _promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install prometheus"
    return path
