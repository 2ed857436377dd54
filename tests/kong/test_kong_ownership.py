"""Governor touches only what it owns in Kong: foreign plugins stay as they are, hostile tenant
ids reach no other entity, mislabelled plugins are reported, and pagination is followed."""

from __future__ import annotations

from structlog.testing import capture_logs

from controller.changes import diff
from tests.kong.conftest import A, SinkFactory, add_consumer, admin_client, plugins_by_owner
from tests.kong.kong_admin import KongAdmin
from tests.support.sink_ticks import converge


def test_a_foreign_rate_limiting_plugin_is_left_alone_and_reported(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    acme = add_consumer(kong, custom_id="acme")
    with admin_client(kong) as operator:
        theirs = operator.post(
            "/plugins",
            json={"name": "rate-limiting", "consumer": {"id": acme}, "config": {"hour": 50}},
        ).json()
        global_theirs = operator.post(
            "/plugins", json={"name": "rate-limiting", "config": {"day": 10**6}, "tags": ["ops"]}
        ).json()
    sink = make_sink(kong)
    desired = {
        A("tenant/acme/requests_per_minute"): 60.0,
        A("global/requests_per_second"): 100.0,
    }
    with capture_logs() as logs:
        result = sink.apply(diff(desired, sink.read()))
    assert {c.address for c in result.mismatched} == set(desired)
    errors = [e["error"] for e in logs if e["event"] == "sink.write_rejected"]
    assert len(errors) == 2
    assert all("Governor does not own" in e for e in errors)
    assert {p["id"]: p["config"] for p in kong.entities("plugins")} == {
        theirs["id"]: theirs["config"],
        global_theirs["id"]: global_theirs["config"],
    }


def test_a_plugin_tagged_by_hand_with_a_false_owner_is_foreign(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    acme = add_consumer(kong, custom_id="acme")
    with admin_client(kong) as operator:
        fake = {  # claims to be beta's, but sits on acme; claims global, but sits on acme
            "name": "rate-limiting",
            "consumer": {"id": acme},
            "config": {"minute": 1},
            "tags": ["governor-managed", "governor-managed|owner|global"],
        }
        assert operator.post("/plugins", json=fake).status_code == 201
    sink = make_sink(kong)
    state = sink.read()
    assert dict(state) == {}
    assert len(state.foreign) == 1
    assert "tagged global but scoped to a consumer" in state.foreign[0]
    sink.apply(diff({}, state))
    assert len(kong.entities("plugins")) == 1  # not Governor's to delete


def test_a_tenant_named_like_another_consumers_id_reaches_nothing(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    victim = add_consumer(kong, username="victim")
    sink = make_sink(kong, consumer_match="username")
    desired = {A(f"tenant/{victim}/requests_per_minute"): 1.0}  # a UUID-shaped tenant id
    converge(sink, desired)
    assert kong.entities("plugins") == []
    assert (
        "no Kong consumer with username" in sink.pending[A(f"tenant/{victim}/requests_per_minute")]
    )
    sink_by_id = make_sink(kong)  # custom_id matching is exact too
    converge(sink_by_id, desired)
    assert kong.entities("plugins") == []


def test_ids_with_every_allowed_character_round_trip_through_tags(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    tenant = "Acme.EU_1:prod+x=y~z-"
    add_consumer(kong, custom_id=tenant)
    add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    desired = {
        A(f"tenant/{tenant}/requests_per_minute"): 7.0,
        A("tenant/acme/requests_per_minute"): 8.0,
    }
    converge(sink, desired)
    assert dict(sink.read()) == desired
    plugins = plugins_by_owner(kong)
    assert plugins[f"tenant|{tenant}"]["config"]["minute"] == 7


def test_listing_follows_every_page_and_the_workspace(
    enterprise: KongAdmin, make_sink: SinkFactory
) -> None:
    tenants = [f"t{i:03d}" for i in range(25)]
    for tenant in tenants:
        add_consumer(enterprise, "ai", custom_id=tenant)
    sink = make_sink(enterprise, workspace="ai", page_size=4)
    desired = {A(f"tenant/{t}/requests_per_minute"): 10.0 + i for i, t in enumerate(tenants)}
    converge(sink, desired)
    assert dict(sink.read()) == desired
    listing = [r for r in enterprise.requests if r.path.startswith("/ai/plugins?")]
    assert any("offset=" in r.path for r in listing)
    assert all(r.status == 200 for r in enterprise.requests if r.method == "GET")
    # A second sink with another tag owns nothing of the first one's.
    other = make_sink(enterprise, workspace="ai", tag="other-governor")
    assert dict(other.read()) == {}
    converge(other, {})
    assert len(enterprise.entities("plugins", "ai")) == len(tenants)
