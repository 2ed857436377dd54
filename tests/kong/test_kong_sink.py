"""Contract tests of the Kong sink against a loopback Admin API that follows Kong's: converge,
write nothing when nothing changed, drift from a hand edit, plans, unsupported limits."""

from __future__ import annotations

import pytest
from structlog.testing import capture_logs

from controller.changes import Change, Drift, diff
from controller.errors import SinkError
from controller.sinks import Sink
from controller.sinks.kong import KongSink
from tests.kong.conftest import (
    A,
    SinkFactory,
    add_consumer,
    admin_client,
    plugins_by_owner,
)
from tests.kong.kong_admin import KongAdmin
from tests.support.sink_ticks import Registry, converge

DESIRED = {
    A("global/requests_per_second"): 200.0,
    A("global/requests_per_minute"): 6000.0,
    A("tenant/acme/requests_per_minute"): 600.0,
    A("tenant/beta/requests_per_second"): 5.0,
    A("tenant/beta/requests_per_minute"): 120.5,
}


@pytest.fixture
def converged(kong: KongAdmin, make_sink: SinkFactory) -> KongSink:
    """A Kong sink after converging DESIRED, with consumers acme and beta."""
    add_consumer(kong, custom_id="acme")
    add_consumer(kong, custom_id="beta")
    sink = make_sink(kong)
    converge(sink, DESIRED)
    return sink


def test_the_sink_converges_kong_to_the_desired_limits(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    acme = add_consumer(kong, custom_id="acme")
    beta = add_consumer(kong, custom_id="beta", username="Beta Corp")
    sink = make_sink(kong)
    assert isinstance(sink, Sink)
    made = converge(sink, DESIRED)
    assert sorted(str(c.address) for c in made) == sorted(str(a) for a in DESIRED)
    plugins = plugins_by_owner(kong)
    assert set(plugins) == {"global", "tenant|acme", "tenant|beta"}
    glob = plugins["global"]
    assert (glob["consumer"], glob["service"], glob["route"]) == (None, None, None)
    assert glob["config"]["second"] == 200
    assert glob["config"]["minute"] == 6000
    assert glob["config"]["limit_by"] == "service"
    assert plugins["tenant|acme"]["consumer"] == {"id": acme}
    assert plugins["tenant|acme"]["config"]["minute"] == 600
    assert plugins["tenant|acme"]["config"]["second"] is None
    assert plugins["tenant|acme"]["config"]["limit_by"] == "consumer"
    assert plugins["tenant|beta"]["consumer"] == {"id": beta}
    assert plugins["tenant|beta"]["config"]["minute"] == 120.5
    assert (
        "governor-managed|wrote|tenant|beta|requests_per_second|5" in plugins["tenant|beta"]["tags"]
    )
    state = sink.read()
    assert dict(state) == DESIRED
    assert state.drift == []
    assert state.as_json()["limits"] == {str(a): v for a, v in sorted(DESIRED.items())}


def test_nothing_is_written_when_nothing_changed(kong: KongAdmin, converged: KongSink) -> None:
    sink = converged
    before_writes, before_reads = kong.writes(), kong.count("GET")
    version = sink.read().version
    for _ in range(3):
        result = sink.apply(diff(DESIRED, sink.read()))
        assert result.applied == ()
        assert result.version == version
    assert kong.writes() == before_writes
    # Per tick (the three reads plus the one above) one listing of the plugins and one of the
    # consumers (which tenant each plugin's consumer is now): no per-tenant lookups.
    gets = [r.path.partition("?")[0] for r in kong.requests[-8:]]
    assert kong.count("GET") - before_reads == 8
    assert gets == ["/plugins", "/consumers"] * 4


def test_one_changed_limit_patches_one_plugin(kong: KongAdmin, converged: KongSink) -> None:
    sink = converged
    version = sink.read().version
    writes = len(kong.requests)
    desired = {**DESIRED, A("tenant/acme/requests_per_minute"): 300.0}
    del desired[A("global/requests_per_second")]
    made = converge(sink, desired)
    assert made == [
        Change(A("global/requests_per_second"), 200.0, None),
        Change(A("tenant/acme/requests_per_minute"), 600.0, 300.0),
    ]
    methods = [r.method for r in kong.requests[writes:] if r.method != "GET"]
    assert methods == ["PATCH", "PATCH"]  # global loses `second`; acme's minute changes
    plugins = plugins_by_owner(kong)
    assert plugins["global"]["config"]["second"] is None
    assert plugins["tenant|acme"]["config"]["minute"] == 300
    assert sink.read().version == version + 1


def test_a_limit_of_zero_is_written_as_one_request_then_refused_until_lifted(
    kong: KongAdmin, converged: KongSink
) -> None:
    # Kong refuses a 0 (its schema wants > 0): the sink kept acme's 600 a minute and served
    # what the policy shed, reporting a failed write every tick. The least Kong counts lets
    # one request a period through, so the 0 stands as 1 with `year: 1` beside it: one
    # request, then refused.
    sink = converged
    shed = {
        **DESIRED,
        A("tenant/acme/requests_per_minute"): 0.0,
        A("global/requests_per_second"): 0.0,
    }
    assert converge(sink, shed) == [
        Change(A("global/requests_per_second"), 200.0, 0.0),
        Change(A("tenant/acme/requests_per_minute"), 600.0, 0.0),
    ]
    plugins = plugins_by_owner(kong)
    acme, glob = plugins["tenant|acme"]["config"], plugins["global"]["config"]
    assert (acme["minute"], acme["year"]) == (1, 1)
    # Kong wants a longer period's limit no lower than a shorter one's: the whole instance
    # sheds (its minute too), as a 0 anywhere in it lets nothing through anyway.
    assert (glob["second"], glob["minute"], glob["year"]) == (1, 1, 1)
    assert plugins["tenant|beta"]["config"]["year"] is None  # beta sheds nothing
    state = sink.read()
    assert dict(state) == shed  # read back as the 0 it stands for: no drift, no rewrite
    assert state.drift == []
    writes = kong.writes()
    assert sink.apply(diff(shed, sink.read())).applied == ()
    assert kong.writes() == writes
    converge(sink, DESIRED)  # lifted: the stand-in and `year` go
    acme = plugins_by_owner(kong)["tenant|acme"]["config"]
    assert (acme["minute"], acme["year"]) == (600, None)


def test_a_hand_edit_is_reported_as_drift_then_reconciled(
    kong: KongAdmin, converged: KongSink
) -> None:
    sink = converged
    acme = plugins_by_owner(kong)["tenant|acme"]
    with admin_client(kong) as operator:  # someone raises acme's limit by hand
        edited = operator.patch(f"/plugins/{acme['id']}", json={"config": {"minute": 9999}})
        assert edited.status_code == 200
    state = sink.read()
    assert state.drift == [Drift(A("tenant/acme/requests_per_minute"), 600.0, 9999.0)]
    assert converge(sink, DESIRED) == [Change(A("tenant/acme/requests_per_minute"), 9999.0, 600.0)]
    assert plugins_by_owner(kong)["tenant|acme"]["config"]["minute"] == 600
    assert sink.read().drift == []


def test_a_deleted_or_disabled_plugin_is_drift_and_comes_back(
    kong: KongAdmin, converged: KongSink
) -> None:
    sink = converged
    plugins = plugins_by_owner(kong)
    with admin_client(kong) as operator:
        assert operator.delete(f"/plugins/{plugins['tenant|acme']['id']}").status_code == 204
        disabled = operator.patch(f"/plugins/{plugins['global']['id']}", json={"enabled": False})
        assert disabled.status_code == 200
    drift = sink.read().drift
    assert Drift(A("tenant/acme/requests_per_minute"), 600.0, None) in drift
    assert Drift(A("global/requests_per_minute"), 6000.0, None) in drift
    converge(sink, DESIRED)
    plugins = plugins_by_owner(kong)
    assert plugins["tenant|acme"]["config"]["minute"] == 600
    assert plugins["global"]["enabled"] is True
    assert sink.read().drift == []


def test_a_hand_changed_setting_is_rewritten_without_a_limit_change(
    kong: KongAdmin, converged: KongSink
) -> None:
    sink = converged
    acme = plugins_by_owner(kong)["tenant|acme"]
    with admin_client(kong) as operator:
        body = {"config": {"limit_by": "ip", "hour": 100000}}
        assert operator.patch(f"/plugins/{acme['id']}", json=body).status_code == 200
    with capture_logs() as logs:
        assert sink.apply(diff(DESIRED, sink.read())).applied == ()
    write = next(e for e in logs if e["event"] == "sink.write")
    assert write["owner"] == "tenant/acme"
    assert sorted(write["why"]) == ["config.hour", "config.limit_by"]
    config = plugins_by_owner(kong)["tenant|acme"]["config"]
    assert (config["limit_by"], config["hour"]) == ("consumer", None)


def test_protocols_narrowed_by_hand_are_restored(kong: KongAdmin, converged: KongSink) -> None:
    # `protocols: [grpc, grpcs]` set by hand: Kong stopped running acme's instance on HTTP
    # (its limit enforced on nothing acme sends) while Governor read the limit as held.
    sink = converged
    acme = plugins_by_owner(kong)["tenant|acme"]
    with admin_client(kong) as operator:
        body = {"protocols": ["grpc", "grpcs"]}
        assert operator.patch(f"/plugins/{acme['id']}", json=body).status_code == 200
    with capture_logs() as logs:
        assert sink.apply(diff(DESIRED, sink.read())).applied == ()
    write = next(e for e in logs if e["event"] == "sink.write")
    assert (write["owner"], write["why"]) == ("tenant/acme", ["protocols"])
    protocols = plugins_by_owner(kong)["tenant|acme"]["protocols"]
    assert sorted(protocols) == ["grpc", "grpcs", "http", "https"]
    assert sink.apply(diff(DESIRED, sink.read())).applied == ()  # settled


def test_plans_are_folded_into_each_tenant_in_the_community_edition(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    for tenant in ("acme", "beta", "carol", "dave"):
        add_consumer(kong, custom_id=tenant)
    registry = Registry(acme="gold", beta="gold", carol="free")
    sink = make_sink(kong, registry)
    desired = {
        A("plan/gold/requests_per_minute"): 600.0,
        A("plan/free/requests_per_minute"): 60.0,
        A("tenant/acme/requests_per_second"): 5.0,
        A("tenant/carol/requests_per_minute"): 90.0,
    }
    converge(sink, desired)
    plugins = plugins_by_owner(kong)
    assert set(plugins) == {"tenant|acme", "tenant|beta", "tenant|carol"}
    assert (
        plugins["tenant|acme"]["config"]["second"],
        plugins["tenant|acme"]["config"]["minute"],
    ) == (5, 600)
    assert plugins["tenant|beta"]["config"]["minute"] == 600
    assert plugins["tenant|carol"]["config"]["minute"] == 90  # its own value beats the plan's
    assert dict(sink.read()) == desired
    # dave joins gold: no limit changed, but his consumer gets the plan's plugin.
    registry["dave"] = "gold"
    writes = kong.writes()
    assert converge(sink, desired) == []
    assert kong.writes() == writes + 1
    assert plugins_by_owner(kong)["tenant|dave"]["config"]["minute"] == 600
    # The plan changes: every member's plugin follows, in one apply.
    desired[A("plan/gold/requests_per_minute")] = 300.0
    assert converge(sink, desired) == [Change(A("plan/gold/requests_per_minute"), 600.0, 300.0)]
    minutes = {k: p["config"]["minute"] for k, p in plugins_by_owner(kong).items()}
    assert minutes == {
        "tenant|acme": 300,
        "tenant|beta": 300,
        "tenant|carol": 90,
        "tenant|dave": 300,
    }
    # A hand edit of one member's plan-sourced field is drift of the plan's limit.
    beta = plugins_by_owner(kong)["tenant|beta"]
    with admin_client(kong) as operator:
        operator.patch(f"/plugins/{beta['id']}", json={"config": {"minute": 1000}})
    assert sink.read().drift == [Drift(A("plan/gold/requests_per_minute"), 300.0, 1000.0)]
    converge(sink, desired)
    # Leaving the plan removes the plan's limit from that tenant's plugin.
    del registry["beta"]
    converge(sink, desired)
    assert "tenant|beta" not in plugins_by_owner(kong)


def test_plans_become_consumer_group_plugins_in_the_enterprise_edition(
    enterprise: KongAdmin, make_sink: SinkFactory
) -> None:
    acme = add_consumer(enterprise, "ai", custom_id="acme")
    registry = Registry(acme="gold", beta="gold")
    sink = make_sink(enterprise, registry, workspace="ai")
    desired = {
        A("plan/gold/requests_per_minute"): 600.0,
        A("plan/gold/requests_per_second"): 20.0,
        A("tenant/acme/requests_per_second"): 5.0,
    }
    converge(sink, desired)
    assert enterprise.entities("plugins") == []  # everything went to the workspace
    groups = enterprise.entities("consumer_groups", "ai")
    assert [g["name"] for g in groups] == ["gold"]
    assert "governor-managed|owner|plan|gold" in groups[0]["tags"]
    plugins = plugins_by_owner(enterprise, "ai")
    assert set(plugins) == {"plan|gold", "tenant|acme"}
    assert plugins["plan|gold"]["consumer_group"] == {"id": groups[0]["id"]}
    assert plugins["plan|gold"]["config"]["minute"] == 600
    # acme's own plugin beats the group's in Kong, so it carries the plan's minute too.
    assert plugins["tenant|acme"]["consumer"] == {"id": acme}
    assert (
        plugins["tenant|acme"]["config"]["second"],
        plugins["tenant|acme"]["config"]["minute"],
    ) == (5, 600)
    assert all(r.status != 401 for r in enterprise.requests)
    assert any(r.path.startswith("/ai/plugins") for r in enterprise.requests)


def test_unsupported_limits_are_reported_never_written(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    unsupported = [
        A("tenant/acme/tokens_per_minute"),
        A("tenant/acme/tokens_per_day"),
        A("global/concurrent_requests"),
        A("tenant/acme/max_tokens_per_request"),
        A("ip/requests_per_minute"),
        A("user/acme/alice/requests_per_minute"),
        A("tenant/acme/requests_per_minute@gpt-4"),
        A("plan/gold/requests_per_minute"),  # no registry, no consumer groups
    ]
    changes = [Change(a, None, 10.0) for a in unsupported]
    changes.append(Change(A("tenant/acme/requests_per_minute"), None, 60.0))
    with capture_logs() as logs:
        result = sink.apply(changes)
        sink.apply(changes)  # warned once per address, not per tick
    assert [c.address for c in result.applied] == [A("tenant/acme/requests_per_minute")]
    assert set(sink.unsupported) == set(unsupported)
    assert "AI Rate Limiting Advanced" in sink.unsupported[A("tenant/acme/tokens_per_minute")]
    assert "consumer groups" in sink.unsupported[A("plan/gold/requests_per_minute")]
    warned = [e["address"] for e in logs if e["event"] == "sink.unsupported_limit"]
    assert sorted(warned) == sorted(str(a) for a in unsupported)
    for address in unsupported:
        assert sink.unsupported_reason(address) is not None
    assert set(plugins_by_owner(kong)) == {"tenant|acme"}
    assert dict(sink.read()) == {A("tenant/acme/requests_per_minute"): 60.0}


def test_a_tenant_without_a_consumer_waits_and_nothing_is_created(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    sink = make_sink(kong)
    desired = {A("tenant/ghost/requests_per_minute"): 60.0}
    with capture_logs() as logs:
        converge(sink, desired)
        converge(sink, desired)
    assert kong.writes() == 0
    assert "no Kong consumer" in sink.pending[A("tenant/ghost/requests_per_minute")]
    assert [e["event"] for e in logs].count("sink.limit_waiting") == 1
    assert dict(sink.read()) == {}  # waiting is not in force
    add_consumer(kong, custom_id="ghost")
    # The waiting limit is written, and only now read as changed.
    assert converge(sink, desired) == [Change(A("tenant/ghost/requests_per_minute"), None, 60.0)]
    assert plugins_by_owner(kong)["tenant|ghost"]["config"]["minute"] == 60
    assert sink.pending == {}


def test_missing_consumers_are_created_when_asked(kong: KongAdmin, make_sink: SinkFactory) -> None:
    sink = make_sink(kong, create_consumers=True)
    converge(sink, {A("tenant/new-co/requests_per_minute"): 60.0})
    consumers = kong.entities("consumers")
    assert [(c["custom_id"], c["username"]) for c in consumers] == [("new-co", None)]
    assert "governor-managed|owner|tenant|new-co" in consumers[0]["tags"]
    assert plugins_by_owner(kong)["tenant|new-co"]["consumer"] == {"id": consumers[0]["id"]}


def test_policy_redis_writes_kongs_redis_record(kong: KongAdmin, make_sink: SinkFactory) -> None:
    add_consumer(kong, custom_id="acme")
    sink = make_sink(
        kong,
        policy="redis",
        redis_host="redis.kong.svc",
        redis_database=2,
        redis_password="pw-not-logged",
        fault_tolerant=False,
    )
    with capture_logs() as logs:
        converge(sink, {A("tenant/acme/requests_per_minute"): 60.0})
    config = plugins_by_owner(kong)["tenant|acme"]["config"]
    assert config["policy"] == "redis"
    assert config["fault_tolerant"] is False
    assert (config["redis"]["host"], config["redis"]["port"]) == ("redis.kong.svc", 6379)
    assert (config["redis"]["database"], config["redis"]["password"]) == (2, "pw-not-logged")
    assert "pw-not-logged" not in repr(logs)


def test_kong_rejecting_a_plugin_is_reported_and_the_rest_is_written(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    add_consumer(kong, custom_id="acme")
    add_consumer(kong, custom_id="beta")
    sink = make_sink(kong)
    desired = {  # Kong refuses a minute limit below the second limit
        A("tenant/acme/requests_per_second"): 20.0,
        A("tenant/acme/requests_per_minute"): 10.0,
        A("tenant/beta/requests_per_minute"): 60.0,
    }
    with capture_logs() as logs:
        result = sink.apply(diff(desired, sink.read()))
    assert {c.address for c in result.mismatched} == {
        A("tenant/acme/requests_per_second"),
        A("tenant/acme/requests_per_minute"),
    }
    rejected = next(e for e in logs if e["event"] == "sink.write_rejected")
    assert "cannot be lower than the limit for second" in rejected["error"]
    assert plugins_by_owner(kong)["tenant|beta"]["config"]["minute"] == 60


def test_an_outage_midway_is_an_error_and_the_next_tick_finishes(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    add_consumer(kong, custom_id="acme")
    add_consumer(kong, custom_id="beta")
    sink = make_sink(kong)
    posts = iter([None, 500])  # the second plugin POST meets a Kong error
    kong.before = lambda method, path: next(posts, None) if method == "POST" else None
    with pytest.raises(SinkError, match="answered 500"):
        sink.apply(diff(DESIRED, sink.read()))
    assert len(plugins_by_owner(kong)) == 1  # no transaction: the first write stays
    state = sink.read()
    assert state.drift == []  # a create that failed is not a deletion
    converge(sink, DESIRED)
    assert dict(sink.read()) == DESIRED


def test_check_names_the_token_setting_and_never_the_token(
    enterprise: KongAdmin, make_sink: SinkFactory
) -> None:
    sink = make_sink(enterprise)
    sink.check()
    wrong = make_sink(enterprise, admin_token="not-the-token")
    with pytest.raises(SinkError, match="GOVERNOR_KONG__ADMIN_TOKEN") as raised:
        wrong.check()
    assert "not-the-token" not in str(raised.value)
    assert "s3cret-admin" not in str(raised.value)


def test_check_refuses_consumer_groups_on_the_community_edition(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    with pytest.raises(SinkError, match="GOVERNOR_KONG__CONSUMER_GROUPS=off"):
        make_sink(kong, consumer_groups="on").check()
    make_sink(kong).check()


def test_an_unreachable_admin_api_is_a_sink_error(make_sink: SinkFactory) -> None:
    gone = KongAdmin()  # never started: nothing listens on its port
    with pytest.raises(SinkError, match="GOVERNOR_KONG__ADMIN_URL"):
        make_sink(gone).read()


def test_credentials_in_the_admin_url_never_reach_an_error(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    # An Admin API behind a basic-auth proxy (Kong's own "secure the Admin API" loopback):
    # the errors named the URL as configured, password included.
    kong.before = lambda method, path: 503
    sink = make_sink(kong, admin_url=kong.url.replace("://", "://ops:pa55w0rd@"))
    with pytest.raises(SinkError, match="answered 503") as raised:
        sink.read()
    assert "pa55w0rd" not in str(raised.value)
    assert "ops:" in str(raised.value)  # which user, still said
    assert "pa55w0rd" not in sink.location
