"""`governor redis migrate`: a real single Redis written under contract 1 (limits, tenants,
API keys, overrides, credits, enforcement state, the journal) copied to a real Cluster under
contract 2 in one command; every command and the gateway then read the same there."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.changes import diff
from controller.cli import app
from controller.clients.redis import aclose, close, connect, connect_async
from controller.contract.catalog import PlanInfo
from controller.contract.enforcement import EnforcementKeys
from controller.contract.keys import KeySchema
from controller.contract.migration import move_of
from controller.control.catalog import publish_catalog
from controller.gateway.admission import Admission, AdmissionRequest
from controller.gateway.catalog import PlanCatalog
from controller.gateway.prices import PriceTable
from controller.policy.loader import load_directory
from controller.settings import PricesSettings, RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.redis import RedisServer
from tests.support.redis_cluster import RedisClusterServers

POLICIES = Path(__file__).resolve().parents[2] / "policies"
V1, V2 = KeySchema(), KeySchema(sharded=True)
READS = (
    ["limits", "get", "--json"],
    ["keys", "list", "--json"],
    ["tenants", "list", "--json"],
    ["override", "list", "--json"],
    ["credits", "show", "acme", "--json"],
)


def cli(url: str, *args: str) -> str:
    env = {**os.environ, "GOVERNOR_REDIS__URL": url, "GOVERNOR_GATEWAY__API_KEY_SECRET": "m"}
    result = CliRunner().invoke(app, list(args), env=env)
    assert result.exit_code == 0, (args, result.output)
    return result.stdout


def admit_and_settle(url: str, request_id: str) -> str:
    """One admission of acme from 10.0.0.7 (every level has state then), settled."""

    async def run() -> str:
        client = connect_async(url, RedisSettings())
        catalog = PlanCatalog(client, "governor")
        admission = Admission(client, "governor", PriceTable.from_settings(PricesSettings()),
                              catalog)  # fmt: skip
        try:
            request = AdmissionRequest("acme", "paid", None, "10.0.0.7", None, 50, request_id)
            result = await admission.admit(request)
            assert result.reservation is not None, result
            assert await admission.settle(result.reservation, "acme", 40, None)
            return result.outcome
        finally:
            await aclose(client)

    return asyncio.run(run())


def comparable(text: str) -> Any:
    """A command's JSON without what may differ: the version (a new token on the Cluster),
    an override's end to the ms (read back from the key's TTL: within a second)."""
    data = json.loads(text)
    if isinstance(data, dict):
        data.pop("version", None)
        for override in data.get("overrides", []):
            override["expires_at"] = Near(override["expires_at"])
    return data


class Near:
    """A time equal to another within a second."""

    def __init__(self, value: float) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Near) and abs(self.value - other.value) < 1.0

    __hash__ = None  # type: ignore[assignment]


@pytest.fixture
def single(tmp_path: Path) -> RedisServer:
    """A single Redis with what a running deployment holds, under contract 1."""
    server = RedisServer(tmp_path / "single").start()
    client = connect(server.url, RedisSettings())
    policies = load_directory(POLICIES)
    sink = RedisSink(client, V1)
    sink.apply(diff(dict(policies.baseline_addresses()), sink.read().actual))
    publish_catalog(client, policies)
    close(client)
    cli(server.url, "tenants", "set", "acme", "paid")
    cli(server.url, "keys", "create", "--tenant", "acme", "--plan", "paid")
    cli(server.url, "override", "set", "tenant/acme/requests_per_minute", "5", "--ttl", "1h",
        "--reason", "INC-7")  # fmt: skip
    cli(server.url, "credits", "top-up", "acme", "5", "--reason", "invoice")
    assert admit_and_settle(server.url, "before") == "allow"
    with server.client() as db:
        db.set("governor:handmade", "x")
    return server


def test_one_command_moves_a_deployment_to_the_cluster(
    single: RedisServer, cluster: RedisClusterServers
) -> None:
    try:
        before = [comparable(cli(single.url, *read)) for read in READS]
        out = cli(single.url, "redis", "migrate", "--to", cluster.url, "--json")
        report = json.loads(out)
        after = [comparable(cli(cluster.url, *read)) for read in READS]
        with single.client() as db:
            stored = list(db.scan_iter("governor:*"))
    finally:
        single.stop()
    assert after == before  # limits, keys, tenants, overrides, credits: the same
    assert report["unknown"] == ["governor:handmade"]
    assert sorted(report["skipped"]) == ["governor:contract", "governor:version"]
    assert report["regrouped"] > 10  # ledger and decision entries, per slot now
    copied = [k for k in stored if move_of(k, V2).action == "copy"]
    assert report["copied"] == len(copied)
    with cluster.client() as client:
        assert client.get(V2.contract) == "2"
        keys = EnforcementKeys(V2)
        used = client.hget(keys.tenant_level("acme").state, "u|tokens_per_day")
        assert used == "40"  # enforcement state carried over: today's usage counts on
        assert client.hlen(keys.global_level().state) > 0  # now in the shared slot
        assert client.hlen(keys.ip_level("10.0.0.7").state) > 0
        assert client.pttl(V2.override(next(iter(_overrides(client))))) > 0  # TTL kept
        kinds = [entry[1]["kind"] for entry in client.xrange(V2.journal)]
        assert {"tenant.set", "key.created", "override.set"} <= set(kinds)
    # The controller's view: nothing drifted, nothing to write again.
    target = connect(cluster.url, RedisSettings())
    try:
        state = RedisSink(target, V2).read()
        assert dict(state.actual) == dict(state.written)
        assert len(state.written) > 10
    finally:
        close(target)
    # The gateway's: the same plan, the same limits, the usage counted on.
    assert admit_and_settle(cluster.url, "after") == "allow"
    with cluster.client() as client:
        assert client.hget(EnforcementKeys(V2).tenant_level("acme").state,
                           "u|tokens_per_day") == "80"  # fmt: skip


def _overrides(client: Any) -> list[Any]:
    from controller.model import Address

    return [Address.parse(text) for text in client.zrange(V2.override_index, 0, -1)]


def test_it_refuses_a_cluster_that_holds_keys_already(
    single: RedisServer, cluster: RedisClusterServers
) -> None:
    try:
        cli(single.url, "redis", "migrate", "--to", cluster.url)
        env = {**os.environ, "GOVERNOR_REDIS__URL": single.url}
        again = CliRunner().invoke(app, ["redis", "migrate", "--to", cluster.url], env=env)
        plain = CliRunner().invoke(app, ["redis", "migrate", "--to", single.url], env=env)
    finally:
        single.stop()
    assert again.exit_code == 2
    assert "holds keys under governor: already" in again.stderr
    assert plain.exit_code == 2
    assert "must be a redis+cluster:// URL" in plain.stderr


def test_where_each_key_goes() -> None:
    moves = {
        "governor:{t:acme}:limits": ("copy", "governor:{t:acme}:limits"),
        "governor:limits:plan:free": ("copy", "governor:{g}:limits:plan:free"),
        "governor:enforce:global:leases": ("copy", "governor:{g}:enforce:global:leases"),
        "governor:enforce:ip:10.0.0.7": ("copy", "governor:{ip:10.0.0.7}:enforce"),
        "governor:enforce:ip:2001%3A0db8%3A0000%3A0000%3A%3A:leases": (
            "copy", "governor:{ip:2001%3A0db8%3A0000%3A0000%3A%3A}:enforce:leases"),
        "governor:enforce:ip:2001:db8::leases": ("unknown", ""),  # an id is escaped
        "governor:override:global/requests_per_second": (
            "copy", "governor:{g}:override:global/requests_per_second"),
        "governor:written": ("split", ""),
        "governor:leader:epoch": ("skip", ""),
        "other:tenants": ("unknown", ""),
    }  # fmt: skip
    for key, (action, target) in moves.items():
        move = move_of(key, V2)
        assert (move.action, move.target) == (action, target), key
    assert PlanInfo()  # the catalog's entries are copied as they are (JSON)
