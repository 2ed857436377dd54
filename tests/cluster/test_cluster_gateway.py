"""The gateway on a real Redis Cluster (contract 2): admission as one admit.lua per slot,
sent together; what a slot took is released when another slot refuses; settles reach every
slot; NOSCRIPT on the masters is handled."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.changes import diff
from controller.clients.redis import aclose, close, connect, connect_async, key_schema
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.control.catalog import publish_catalog
from controller.gateway.admission import Admission, AdmissionRequest, TokensUsed
from controller.gateway.catalog import PlanCatalog
from controller.gateway.keys import KeyStore
from controller.gateway.prices import PriceTable
from controller.model import Address
from controller.policy.loader import load_directory
from controller.settings import PricesSettings, RedisSettings
from controller.sinks.redis import RedisSink
from tests.gateway.conftest import budget_remaining, start_gateway
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.support.redis_cluster import RedisClusterServers

SECRET = "test-secret"  # start_gateway's
# Global concurrency (shared by weight) and a global daily budget: the shared slot holds
# leases to release.
POLICIES = """\
{apiVersion: governor/v1, kind: Plan, metadata: {name: free},
 spec: {models: [gpt-3.5-turbo], limits: {requests_per_minute: 10, tokens_per_day: 1000}}}
---
{apiVersion: governor/v1, kind: Plan, metadata: {name: solo},
 spec: {limits: {requests_per_minute: 600, concurrent_requests: 1}}}
---
{apiVersion: governor/v1, kind: Limits, metadata: {name: global},
 spec: {default_plan: free, ip: {requests_per_minute: 1000},
        global: {requests_per_second: 1000, concurrent_requests: 100, concurrent_headroom: 0.1,
                 tokens_per_day: 1000000}}}
"""
V2 = EnforcementKeys.for_prefix("governor", sharded=True)


@pytest.fixture
def limits(cluster: RedisClusterServers, tmp_path: Path) -> Path:
    """The limits and catalog of POLICIES on the cluster, written as the controller does."""
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "plans.yaml").write_text(POLICIES)
    policies = load_directory(directory)
    client = connect(cluster.url, RedisSettings())
    try:
        sink = RedisSink(client, key_schema(client, "governor"))
        sink.apply(diff(dict(policies.baseline_addresses()), sink.read().actual))
        publish_catalog(client, policies)
    finally:
        close(client)
    return directory


@pytest.fixture
def upstream() -> Iterator[tuple[FakeUpstream, str]]:
    fake = FakeUpstream()
    server = ServerThread(fake.app()).start()
    yield fake, server.url
    server.stop()


def test_the_gateway_admits_and_refuses_on_a_cluster(
    cluster: RedisClusterServers, limits: Path, upstream: tuple[FakeUpstream, str]
) -> None:
    with cluster.client() as client:
        key, _ = KeyStore(client, V2.schema, SECRET).create("acme", "free")  # type: ignore[arg-type]
    gateway = start_gateway(cluster.url, upstream[1])
    try:
        first = [gateway.chat(key).status_code for _ in range(5)]
        for node in cluster.nodes:  # every master forgets the scripts: NOSCRIPT, then loaded
            with node.client() as direct:
                direct.script_flush()
        answers = [gateway.chat(key) for _ in range(7)]
    finally:
        gateway.stop()
    assert first == [200] * 5
    assert [a.status_code for a in answers] == [200] * 5 + [429, 429]
    refusal = answers[-1].json()
    assert "requests_per_minute" in refusal["violated-policies"][0]
    assert answers[0].headers["ratelimit-policy"]
    with cluster.client() as client:
        shared = V2.global_level()
        assert client.hget(shared.state, "c|concurrent_requests") == "0"  # all settled
        assert client.zcard(shared.leases) == 0
        used = client.hget(V2.tenant_level("acme").state, "u|tokens_per_day")
        assert used is not None
        assert int(used) > 0
        assert client.hget(shared.state, "u|tokens_per_day") == used  # both slots charged


def test_a_refusal_in_one_slot_releases_what_the_others_took(
    cluster: RedisClusterServers, limits: Path
) -> None:
    def request(rid: str) -> AdmissionRequest:
        return AdmissionRequest("solo1", "solo", None, "10.0.0.7", None, 10, rid)

    async def scenario() -> tuple[list[str], list[str | None], bool]:
        client = connect_async(cluster.url, RedisSettings())
        catalog = PlanCatalog(client, "governor")
        admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()),
                              catalog)  # fmt: skip
        try:
            held = await admission.admit(request("r1"))
            refused = await admission.admit(request("r2"))  # the tenant's 1 slot is taken
            shared = V2.global_level().state
            during = await client.hmget(shared, ["c|concurrent_requests", "o|tenant/solo1/", "a"])
            assert held.reservation is not None
            settled = await admission.settle(held.reservation, "solo1", 12, None)
            after = await client.hmget(shared, ["c|concurrent_requests", "o|tenant/solo1/", "a"])
            return [held.outcome, refused.outcome], [*during, *after], settled
        finally:
            await aclose(client)

    outcomes, concurrency, settled = asyncio.run(scenario())
    assert outcomes == ["allow", "rate_limited"]
    # The refused request's global slot and share were taken in the shared slot, then given
    # back; the settle gives back the first one's.
    assert concurrency == ["1", "1", "1", "0", None, "0"]
    assert settled
    with cluster.client() as client:
        assert client.zcard(V2.global_level().leases) == 0
        assert client.zcard(V2.ip_level("10.0.0.7").leases) == 0
        assert client.hget(V2.global_level().state, "u|tokens_per_day") == "12"


def test_a_damaged_counter_in_one_slot_is_named_and_releases_what_the_others_took(
    cluster: RedisClusterServers, limits: Path
) -> None:
    tenant = V2.tenant_level("solo2").state
    with cluster.client() as client:
        client.hset(tenant, "c|concurrent_requests", "nan")  # Lua 5.1 reads it as a number

    async def scenario() -> tuple[str, str | None, list[str | None]]:
        client = connect_async(cluster.url, RedisSettings())
        catalog = PlanCatalog(client, "governor")
        admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()),
                              catalog)  # fmt: skip
        try:
            wanted = AdmissionRequest("solo2", "solo", None, None, None, 10, "r1")
            refused = await admission.admit(wanted)
            shared = V2.global_level().state
            after = await client.hmget(shared, ["c|concurrent_requests", "o|tenant/solo2/"])
            return refused.outcome, refused.damage, after
        finally:
            await aclose(client)

    outcome, damage, shared_after = asyncio.run(scenario())
    assert outcome == "corrupt_state"
    assert damage is not None
    assert f"{tenant} field c|concurrent_requests holds 'nan'" in damage
    assert shared_after == ["0", None]  # the shared slot's hold was given back


def test_plans_are_read_from_the_shared_slot(cluster: RedisClusterServers, limits: Path) -> None:
    async def read() -> dict[str, PlanInfo] | None:
        client = connect_async(cluster.url, RedisSettings())
        try:
            catalog = PlanCatalog(client, "governor")
            await catalog.refresh()
            return dict(catalog.plans or {})
        finally:
            await aclose(client)

    plans = asyncio.run(read())
    assert plans is not None
    assert set(plans) == {"free", "solo"}


def test_a_fail_open_charge_reaches_every_slot(cluster: RedisClusterServers, limits: Path) -> None:
    async def charge() -> int:
        client = connect_async(cluster.url, RedisSettings())
        admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()),
                              PlanCatalog(client, "governor"))  # fmt: skip
        try:
            served = AdmissionRequest("acme", "free", None, "10.0.0.7", None, 50, "open1")
            return await admission.charge(served, TokensUsed(30, 12))
        finally:
            await aclose(client)

    assert asyncio.run(charge()) == 2  # the global and the tenant's daily budgets
    with cluster.client() as client:
        assert client.hget(V2.global_level().state, "u|tokens_per_day") == "42"
        assert client.hget(V2.tenant_level("acme").state, "u|tokens_per_day") == "42"


def test_a_continued_conversation_is_recorded_and_reserved_on_a_cluster(
    cluster: RedisClusterServers, limits: Path, upstream: tuple[FakeUpstream, str]
) -> None:
    """The record sits in the tenant's slot (`{t:acme}`), read and written by the cluster
    client like any one-key command."""
    with cluster.client() as client:
        key, _ = KeyStore(client, V2.schema, SECRET).create("acme", "free")  # type: ignore[arg-type]
    gateway = start_gateway(cluster.url, upstream[1])
    try:
        sent = {"authorization": f"Bearer {key}", "x-fake-tokens": "300"}
        body = {"model": "gpt-3.5-turbo", "input": "hi", "max_output_tokens": 300}
        first = gateway.http.post(f"{gateway.url}/v1/responses", json=body, headers=sent)
        assert first.status_code == 200, first.text
        with cluster.client() as client:
            assert client.get(V2.schema.response("acme", first.json()["id"])) == "307"
        body = {**body, "max_output_tokens": 16, "previous_response_id": first.json()["id"]}
        second = gateway.http.post(f"{gateway.url}/v1/responses", json=body, headers=sent)
        assert second.status_code == 200, second.text
        assert budget_remaining(second) == 1000 - 307 - (307 + 1 + 16)
    finally:
        gateway.stop()


def test_ids_that_meet_once_joined_keep_their_own_slot_and_limits_on_a_cluster(
    cluster: RedisClusterServers, limits: Path, upstream: tuple[FakeUpstream, str]
) -> None:
    """Tenant `a` with user `b:c` and tenant `a:b` with user `c`, and ids of the longest
    length: every key of one admission is in its tenant's slot (no CROSSSLOT, no 5xx), and
    one's user limit, spent, leaves the other's whole."""
    who = [("a", "b:c"), ("a:b", "c"), ("t" * 128, "u:" + "v" * 126)]
    with cluster.client() as client:
        sink = RedisSink(client, key_schema(client, "governor"))  # type: ignore[arg-type]
        actual = sink.read().actual
        wanted = {Address.parse(f"user/{t}/{u}/requests_per_minute"): 1.0 for t, u in who}
        sink.apply(diff({**actual, **wanted}, actual))
        store = KeyStore(client, V2.schema, SECRET)  # type: ignore[arg-type]
        keys = [store.create(tenant, "free", user)[0] for tenant, user in who]
    gateway = start_gateway(cluster.url, upstream[1])
    try:
        answers = [[gateway.chat(key).status_code for _ in range(2)] for key in keys]
    finally:
        gateway.stop()
    assert answers == [[200, 429]] * 3
    with cluster.client() as client, cluster.nodes[0].client() as node:
        for tenant, user in who:
            user_state = V2.user_level(tenant, user).state
            assert client.hget(user_state, "g|requests_per_minute") is not None
            slots = {node.execute_command("CLUSTER KEYSLOT", key)
                     for key in (V2.schema.tenant_tag(tenant), user_state)}  # fmt: skip
            assert len(slots) == 1


def test_a_background_response_is_settled_at_its_usage_in_every_slot(
    cluster: RedisClusterServers, limits: Path, upstream: tuple[FakeUpstream, str]
) -> None:
    """Charged its reservation when queued, on the tenant's and the global daily budget (two
    slots); read finished, each slot gets the rest back, once (each slot's charge record)."""
    with cluster.client() as client:
        key, _ = KeyStore(client, V2.schema, SECRET).create("umbra", "free")  # type: ignore[arg-type]
    gateway = start_gateway(cluster.url, upstream[1])
    budgets = (V2.tenant_level("umbra").state, V2.global_level().state)

    def used() -> list[int]:
        with cluster.client() as client:
            return [int(client.hget(state, "u|tokens_per_day") or 0) for state in budgets]

    try:
        sent = {"authorization": f"Bearer {key}"}
        body = {"model": "gpt-3.5-turbo", "input": "later", "max_output_tokens": 900,
                "background": True}  # fmt: skip
        start = used()
        queued = gateway.http.post(f"{gateway.url}/v1/responses", json=body, headers=sent)
        assert queued.status_code == 200, queued.text
        charged = [after - before for after, before in zip(used(), start, strict=True)]
        assert charged[0] == charged[1] > 900
        path = f"{gateway.url}/v1/responses/{queued.json()['id']}"
        for _ in range(2):
            done = gateway.http.get(path, headers=sent)
            assert done.json()["status"] == "completed", done.text
        real = done.json()["usage"]["total_tokens"]
        assert [after - before for after, before in zip(used(), start, strict=True)] == [real] * 2
    finally:
        gateway.stop()


def test_a_background_response_holds_its_slots_in_every_slot_until_read_finished(
    cluster: RedisClusterServers, limits: Path, upstream: tuple[FakeUpstream, str]
) -> None:
    """A `solo` tenant (one request in flight) runs a background response: its slot in the
    tenant's slot and its share of the global concurrency in the shared one stay held while
    it generates (the next request refused 429), and both come back when it is read
    finished (the next admitted)."""
    with cluster.client() as client:
        key, _ = KeyStore(client, V2.schema, SECRET).create("busy", "solo")  # type: ignore[arg-type]
    gateway = start_gateway(cluster.url, upstream[1])
    fake = upstream[0]
    levels = (V2.tenant_level("busy").state, V2.global_level().state)

    def in_flight() -> list[str | None]:
        with cluster.client() as client:
            return [client.hget(state, "c|concurrent_requests") for state in levels]

    try:
        sent = {"authorization": f"Bearer {key}"}
        body = {"model": "gpt-3.5-turbo", "input": "later", "max_output_tokens": 16,
                "background": True}  # fmt: skip
        queued = gateway.http.post(f"{gateway.url}/v1/responses", json=body, headers=sent)
        assert queued.status_code == 200, queued.text
        named = queued.json()["id"]
        held = next(k for k in fake.responses if k.endswith(named))
        answer = fake.responses[held]
        fake.responses[held] = {**answer, "status": "in_progress", "usage": None}
        assert in_flight() == ["1", "1"]
        with cluster.client() as client:
            assert client.hget(levels[1], "o|tenant/busy/") == "1"
        assert gateway.chat(key).status_code == 429
        fake.responses[held] = answer
        done = gateway.http.get(f"{gateway.url}/v1/responses/{named}", headers=sent)
        assert done.json()["status"] == "completed", done.text
        assert in_flight() == ["0", "0"]
        assert gateway.chat(key).status_code == 200
    finally:
        gateway.stop()


def test_a_read_running_renews_the_kept_leases_in_every_slot(
    cluster: RedisClusterServers, limits: Path, upstream: tuple[FakeUpstream, str]
) -> None:
    """A `solo` tenant's background response runs past its admission's lease (moved to 1.5 s
    from now here in both slots: the tenant's and the shared one): a read answered
    `in_progress` renews the kept lease in each slot (each its own settle.lua), so after the
    original end the next request is still refused; read finished, both come back."""
    with cluster.client() as client:
        key, _ = KeyStore(client, V2.schema, SECRET).create("long", "solo")  # type: ignore[arg-type]
    gateway = start_gateway(cluster.url, upstream[1])
    fake = upstream[0]
    levels = (V2.tenant_level("long"), V2.global_level())
    try:
        sent = {"authorization": f"Bearer {key}"}
        body = {"model": "gpt-3.5-turbo", "input": "long", "max_output_tokens": 16,
                "background": True}  # fmt: skip
        queued = gateway.http.post(f"{gateway.url}/v1/responses", json=body, headers=sent)
        assert queued.status_code == 200, queued.text
        named, rid = queued.json()["id"], queued.headers["x-governor-request-id"]
        held = next(k for k in fake.responses if k.endswith(named))
        answer = fake.responses[held]
        fake.responses[held] = {**answer, "status": "in_progress", "usage": None}
        with cluster.client() as client:
            kept = [next(m for m in client.zrange(level.leases, 0, -1)
                         if m.startswith(f"h|{rid}|0|")) for level in levels]  # fmt: skip
            now_ms = client.time()[0] * 1000
            for level, member in zip(levels, kept, strict=True):
                client.zadd(level.leases, {member: now_ms + 1500})

        read = gateway.http.get(f"{gateway.url}/v1/responses/{named}", headers=sent)
        assert read.json()["status"] == "in_progress", read.text
        with cluster.client() as client:
            for level, member in zip(levels, kept, strict=True):
                assert (client.zscore(level.leases, member) or 0) >= now_ms + 599_000, level
            while client.time()[0] * 1000 <= now_ms + 2500:  # past the original end
                time.sleep(0.1)
            for level in levels:
                client.hset(level.state, "n", str(now_ms))  # each level's care is due
        assert gateway.chat(key).status_code == 429

        fake.responses[held] = answer
        done = gateway.http.get(f"{gateway.url}/v1/responses/{named}", headers=sent)
        assert done.json()["status"] == "completed", done.text
        assert gateway.chat(key).status_code == 200
    finally:
        gateway.stop()
