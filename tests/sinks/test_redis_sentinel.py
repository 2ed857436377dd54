"""Redis behind Sentinel (`redis+sentinel://`): a real master, a replica and a Sentinel. The
controller's sink, the CLI and the gateway's client find the master through the Sentinel;
after a failover the next write reaches the new master (nothing written before is lost,
nothing is half-applied); malformed URLs are refused naming what is wrong."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from controller.changes import diff
from controller.cli import app
from controller.clients.redis import (
    MASTER_CHECK_SECONDS,
    aclose,
    close,
    connect,
    connect_async,
    masked_url,
    parse_sentinel_url,
)
from controller.contract.catalog import PlanInfo
from controller.errors import ConfigurationError, SinkError
from controller.gateway.admission import Admission, AdmissionRequest
from controller.gateway.catalog import PlanCatalog
from controller.gateway.prices import PriceTable
from controller.logging import mask_text
from controller.model import Address
from controller.settings import PricesSettings, RedisSettings, Settings
from controller.sinks.redis import RedisSink
from tests.support.process import wait_for
from tests.support.redis import RedisServer, SentinelServer, free_port

pytestmark = pytest.mark.integration

PASSWORD = "s3ntinel-pw"
FIRST = Address.parse("plan/free/requests_per_minute")
SECOND = Address.parse("plan/free/tokens_per_day")


def _replica_in_sync(sentinel: SentinelServer) -> bool:
    with sentinel.client() as client:
        replicas = client.execute_command("SENTINEL", "REPLICAS", sentinel.service)
    return any(r.get("master-link-status") == "ok" for r in replicas)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[RedisServer, RedisServer, SentinelServer]]:
    master = RedisServer(tmp_path / "master", password=PASSWORD).start()
    replica = RedisServer(tmp_path / "replica", password=PASSWORD, replica_of=master.port)
    replica.start()
    sentinel = SentinelServer(tmp_path / "sentinel", master.port, password=PASSWORD).start()
    try:
        wait_for(lambda: _replica_in_sync(sentinel), lambda: "the replica never synced", 30.0, 0.1)
        yield master, replica, sentinel
    finally:
        sentinel.stop()
        replica.stop()
        master.stop()


def test_writes_follow_the_master_through_a_failover(
    fleet: tuple[RedisServer, RedisServer, SentinelServer], request: pytest.FixtureRequest
) -> None:
    master, replica, sentinel = fleet
    sink = RedisSink.from_url(sentinel.url(), RedisSettings(retries=8))
    request.addfinalizer(lambda: close(sink.client))
    sink.apply(diff({FIRST: 10.0}, sink.read().actual))
    with master.client() as db:
        assert db.keys("governor:*")  # the write went to the master

    with sentinel.client() as client:
        assert client.execute_command("SENTINEL", "FAILOVER", sentinel.service)
    wait_for(lambda: sentinel.master_port_now() == replica.port, lambda: "no failover", 90.0, 0.1)

    # As the controller does every tick: diff the desired state against what Redis holds and
    # write the difference. A write that reached the old master in the moment before Sentinel
    # turned it into a replica is lost with it (replication is asynchronous); the next tick
    # sees it missing and writes it again, on the new master.
    desired = {FIRST: 10.0, SECOND: 1000.0}
    env = {"GOVERNOR_REDIS__URL": sentinel.url()}

    def shown_by_a_new_client() -> set[str]:
        shown = CliRunner().invoke(app, ["limits", "get", "--json"], env=env)
        assert shown.exit_code == 0, shown.output
        return set(json.loads(shown.stdout)["limits"])

    deadline = time.monotonic() + 90.0  # generous: a loaded CI machine fails over slowly
    last: SinkError | None = None
    while True:
        # The old master may refuse (read-only) or go away: the next tick tries again.
        try:
            sink.apply(diff(desired, sink.read().actual))
        except SinkError as exc:
            last = exc
        if shown_by_a_new_client() == {str(a) for a in desired}:
            break
        assert time.monotonic() < deadline, (
            f"the limits never reached the new master: {_where(sink, fleet, SECOND)}; "
            f"last error: {last}"
        )
        time.sleep(0.2)
    with replica.client() as db:
        assert db.execute_command("ROLE")[0] == "master"  # what the CLI read is the new master

    async def role() -> object:
        client = connect_async(sentinel.url(), RedisSettings())
        try:
            return (await client.execute_command("ROLE"))[0]  # type: ignore[no-untyped-call]
        finally:
            await aclose(client)

    assert asyncio.run(role()) == "master"  # the gateway's client finds the new master too


def _where(
    sink: RedisSink, fleet: tuple[RedisServer, RedisServer, SentinelServer], address: Address
) -> str:
    """What a failing failover test reports: which node each of the sink's connections is
    on, which nodes hold `address`'s limit, and the role each node gives itself."""
    master, replica, sentinel = fleet
    pool = sink.client.connection_pool
    ports = sorted(c.port for c in pool._available_connections if c.is_connected)
    key, field = sink.keys.owner_and_field(address)
    held = {}
    for name, node in (("old master", master), ("new master", replica)):
        with node.client() as db:
            held[f"{name} :{node.port}"] = (db.execute_command("ROLE")[0], db.hget(key, field))
    return (
        f"Sentinel names :{sentinel.master_port_now()}; the sink is connected to {ports}; "
        f"(role, {address}) per node: {held}"
    )


def _admitted_on(node: RedisServer, request_id: str) -> bool:
    """Whether `node` holds a lease of the admission `request_id` (admit.lua keeps one per
    level in a sorted set, its member naming the request)."""
    with node.client() as db:
        return any(
            request_id in member
            for key in db.scan_iter(match="governor:*")
            if db.type(key) == "zset"  # type: ignore[no-untyped-call]
            for member in db.zrange(key, 0, -1)
        )


def test_pooled_connections_leave_an_old_master_sentinel_has_not_demoted_yet(
    fleet: tuple[RedisServer, RedisServer, SentinelServer], request: pytest.FixtureRequest
) -> None:
    """Sentinel names the new master at once, but turns the old one (still up, still a
    master) into a replica only 4 publish periods later, and not at all while it is in TILT
    mode (a stalled Sentinel, as on a loaded machine) or cut off from the old master. Until
    then a connection left open to the old master writes there without an error, and what
    it writes is lost with the old master's data. Here the Sentinel holds back for the
    test's length: the sink's writes and the gateway's admissions must still reach the new
    master within a few of the clients' master checks."""
    master, replica, sentinel = fleet
    with sentinel.client() as client:
        client.execute_command("SENTINEL", "DEBUG", "PUBLISH-PERIOD", 600_000)
    sink = RedisSink.from_url(sentinel.url(), RedisSettings(retries=8))
    request.addfinalizer(lambda: close(sink.client))
    sink.apply(diff({FIRST: 1000.0}, sink.read().actual))  # opens the pooled connection

    async def scenario() -> None:
        client = connect_async(sentinel.url(), RedisSettings())
        try:
            catalog = PlanCatalog.fixed(client, "governor", {"free": PlanInfo()})
            prices = PriceTable.from_settings(PricesSettings())
            admission = Admission(client, "governor", prices, catalog)
            ids = iter(range(1000))

            async def admit() -> str:
                rid = f"req-{next(ids)}"
                result = await admission.admit(AdmissionRequest("acme", "free", None, None,
                                                                None, 1, rid))  # fmt: skip
                assert result.outcome == "allow", result
                return rid

            assert _admitted_on(master, await admit())  # the gateway's pooled connection

            with sentinel.client() as admin:
                assert admin.execute_command("SENTINEL", "FAILOVER", sentinel.service)
            wait_for(lambda: sentinel.master_port_now() == replica.port, lambda: "no failover",
                     30.0, 0.05)  # fmt: skip
            switched = time.monotonic()
            deadline = switched + 3 * MASTER_CHECK_SECONDS + 1.0
            desired = {FIRST: 1000.0, SECOND: 1000.0}
            last: SinkError | None = None
            while True:  # the controller's ticks, sped up
                try:
                    sink.apply(diff(desired, sink.read().actual))
                except SinkError as exc:
                    last = exc
                with replica.client() as db:
                    if db.hget(*sink.keys.owner_and_field(SECOND)) is not None:
                        break
                assert time.monotonic() < deadline, (
                    f"{time.monotonic() - switched:.1f} s after the failover the sink still "
                    f"writes elsewhere: {_where(sink, fleet, SECOND)}; last error: {last}"
                )
                await asyncio.sleep(0.1)
            rid = ""
            while not (rid and _admitted_on(replica, rid)):
                assert time.monotonic() < deadline, (
                    f"{time.monotonic() - switched:.1f} s after the failover the gateway's "
                    f"admission {rid} is on the old master :{master.port} "
                    f"({_admitted_on(master, rid)}), not on the new one :{replica.port}"
                )
                rid = await admit()
                await asyncio.sleep(0.1)
        finally:
            await aclose(client)

    asyncio.run(scenario())
    with master.client() as db:
        assert db.execute_command("ROLE")[0] == "master"  # the demotion was held back indeed


def test_the_sentinel_url_carries_hosts_service_db_and_credentials() -> None:
    target = parse_sentinel_url(
        "redis+sentinel://app:pw%40x@s-0:26380,s-1/my-master/3?sentinel_password=sp"
    )
    assert target.sentinels == [("s-0", 26380), ("s-1", 26379)]
    assert (target.service, target.db) == ("my-master", 3)
    assert (target.username, target.password, target.sentinel_password) == ("app", "pw@x", "sp")
    url = "redis+sentinel://:pw@s-0/m/0?sentinel_password=sp"
    for masked in (masked_url(url), mask_text(f"connecting to {url} failed")):
        assert "pw" not in masked.replace("sentinel_password", "")
        assert "sp" not in masked.replace("sentinel_password", "")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis+sentinel:///mymaster", "no Sentinel host"),
        ("redis+sentinel://s-0:26379", "the path must be"),
        ("redis+sentinel://s-0/mymaster/zero", "database 'zero'"),
        ("redis+sentinel://s-0:port/mymaster", "port 'port'"),
        ("redis+sentinel://s-0/mymaster?master=x", "unknown parameter master"),
    ],
)
def test_a_malformed_sentinel_url_names_the_problem_and_an_example(url: str, why: str) -> None:
    with pytest.raises(ConfigurationError, match=why) as refused:
        connect(url, RedisSettings())
    assert "redis+sentinel://:password@sentinel-0:26379" in str(refused.value)


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://:s3cret/PW@s-0:26379/mymaster",
        "redis+sentinel://u:s3cret?PW@s-0/mymaster?sentinel_password=sp",
        "redis+cluster://:s3cret/PW@node-0:6379",
        "redis+cluster://u:s3cret#PW@node-0/0",
    ],
)
def test_a_password_with_slash_or_question_mark_is_refused_without_naming_it(url: str) -> None:
    """It was refused as "port 's3cret' of ':s3cret' is not a number": the password shown."""
    with pytest.raises(ConfigurationError, match="percent-encode them") as refused:
        connect(url, RedisSettings())
    assert "s3cret" not in str(refused.value)


def test_no_sentinel_answering_is_said_by_address_not_by_client_repr() -> None:
    """It printed ~900 characters of redis-py pool settings per Sentinel."""
    ports = (free_port(), free_port())
    url = f"redis+sentinel://:pw@127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/mymaster"
    result = CliRunner().invoke(app, ["limits", "get"], env={"GOVERNOR_REDIS__URL": url})

    assert result.exit_code == 1, result.output
    said = result.stderr
    assert "No master found for 'mymaster'" in said
    for port in ports:
        assert f"Sentinel 127.0.0.1:{port} - " in said
    assert "<redis." not in said
    assert len(said) < 600, said


def test_a_sentinel_url_is_a_valid_extra_sink() -> None:
    settings = Settings(controller={"sinks": ["redis", "redis+sentinel://s-0/mymaster/0"]})
    assert settings.controller.sinks[1].startswith("redis+sentinel://")
