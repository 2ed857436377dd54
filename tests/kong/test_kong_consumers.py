"""Consumers edited by hand: a tenant's limit follows its consumer as Kong holds it now.

An operator may move a consumer's custom_id, delete a consumer and create another for the
tenant (a new id), or delete it outright. The sink kept a tenant → consumer id mapping from
its first lookup, so a moved custom_id left the limit on the old consumer (someone else's)
for good, and a recreated consumer cost a refused write. Now each pass reads the consumers,
a plugin on a consumer no longer its tenant's is moved (one PATCH) or removed, and a tenant
without a consumer waits with a reason that names it and the fix."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from structlog.testing import capture_logs

from controller.changes import Change, diff
from controller.contract.keys import KeySchema
from controller.control.reconciler import Reconciler
from controller.errors import SinkError
from controller.journal.reader import read_events
from controller.journal.writer import Journal
from controller.model import Decision, Source
from controller.settings import JournalSettings
from tests.kong.conftest import A, SinkFactory, add_consumer, admin_client, plugins_by_owner
from tests.kong.kong_admin import KongAdmin
from tests.support.sink_ticks import Registry, converge

DESIRED = {
    A("tenant/acme/requests_per_minute"): 600.0,
    A("tenant/beta/requests_per_second"): 5.0,
}
ACME = {A("tenant/acme/requests_per_minute"): 600.0}


def patch_consumer(admin: KongAdmin, consumer: str, **fields: Any) -> None:
    with admin_client(admin) as operator:
        response = operator.patch(f"/consumers/{consumer}", json=fields)
        assert response.status_code == 200, response.text


def delete_consumer(admin: KongAdmin, consumer: str) -> None:
    with admin_client(admin) as operator:
        assert operator.delete(f"/consumers/{consumer}").status_code == 204


def consumer_of(plugin: dict[str, Any]) -> str:
    return str(plugin["consumer"]["id"])


def test_a_custom_id_moved_to_another_consumer_takes_the_limit_with_it(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    old = add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    converge(sink, ACME)
    plugin = plugins_by_owner(kong)["tenant|acme"]
    # The operator hands the tenant id to a new consumer; the old one is someone else's now.
    patch_consumer(kong, old, custom_id="acme-2019")
    new = add_consumer(kong, custom_id="acme")
    state = sink.read()
    assert A("tenant/acme/requests_per_minute") not in state  # not acme's limit any more
    assert [d.address for d in state.drift] == [A("tenant/acme/requests_per_minute")]
    with capture_logs() as logs:
        converge(sink, ACME)
    moved = plugins_by_owner(kong)["tenant|acme"]
    assert (moved["id"], consumer_of(moved)) == (plugin["id"], new)  # one PATCH, same plugin
    assert [p for p in kong.entities("plugins") if consumer_of(p) == old] == []
    write = next(e for e in logs if e["event"] == "sink.write")
    assert write["op"] == "update"
    assert f"sits on consumer {old}, which has custom_id 'acme-2019' now" in write["why"][0]
    assert dict(sink.read()) == ACME


def test_swapped_custom_ids_swap_the_limits(kong: KongAdmin, make_sink: SinkFactory) -> None:
    x = add_consumer(kong, custom_id="acme")
    y = add_consumer(kong, custom_id="beta")
    sink = make_sink(kong)
    converge(sink, DESIRED)
    patch_consumer(kong, x, custom_id="swap")  # custom_id is unique: through a spare id
    patch_consumer(kong, y, custom_id="acme")
    patch_consumer(kong, x, custom_id="beta")
    # Each tenant's consumer holds the other's plugin: one move is refused (409), that
    # plugin is removed rather than left on the wrong consumer, and the next pass creates it.
    with capture_logs() as logs:
        sink.apply(diff(DESIRED, sink.read()))
    # acme's move came first and was refused: removed, not left on beta's consumer.
    assert {o: consumer_of(p) for o, p in plugins_by_owner(kong).items()} == {"tenant|beta": x}
    rejected = [e["error"] for e in logs if e["event"] == "sink.write_rejected"]
    assert len(rejected) == 1
    assert "was removed" in rejected[0]
    assert "written on the next pass" in rejected[0]
    converge(sink, DESIRED)
    plugins = plugins_by_owner(kong)
    assert consumer_of(plugins["tenant|acme"]) == y
    assert consumer_of(plugins["tenant|beta"]) == x
    assert plugins["tenant|acme"]["config"]["minute"] == 600
    assert plugins["tenant|beta"]["config"]["second"] == 5
    assert dict(sink.read()) == DESIRED


def test_a_consumer_deleted_and_created_again_gets_the_limit_at_once(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    old = add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    converge(sink, ACME)
    delete_consumer(kong, old)  # Kong deletes its plugins with it (on_delete cascade)
    new = add_consumer(kong, custom_id="acme")
    with capture_logs() as logs:
        converge(sink, ACME)  # every tick verified: no write to the vanished id
    assert not [e for e in logs if e["event"] == "sink.write_rejected"]
    assert consumer_of(plugins_by_owner(kong)["tenant|acme"]) == new


def test_a_deleted_consumer_leaves_its_tenant_waiting_with_the_fix(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    acme = add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    converge(sink, ACME)
    delete_consumer(kong, acme)
    writes = kong.writes()
    with capture_logs() as logs:
        sink.apply(diff(ACME, sink.read()))
    assert kong.writes() == writes  # nothing sent to the vanished consumer
    assert not [e for e in logs if e["event"] == "sink.write_rejected"]
    reason = sink.pending[A("tenant/acme/requests_per_minute")]
    assert "tenant 'acme' has no Kong consumer with custom_id 'acme'" in reason
    assert "GOVERNOR_KONG__CREATE_CONSUMERS=true" in reason
    assert [e["reason"] for e in logs if e["event"] == "sink.limit_waiting"] == [reason]
    state = sink.read()  # Kong holds no limit for acme: none is read as in force
    assert (dict(state), dict(state.written)) == ({}, {})


def test_a_consumer_that_no_longer_carries_the_tenant_id_loses_the_limit(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    acme = add_consumer(kong, custom_id="acme")
    beta = add_consumer(kong, custom_id="beta")
    sink = make_sink(kong)
    converge(sink, DESIRED)
    patch_consumer(kong, acme, custom_id="someone-else")  # no consumer is acme's now
    with capture_logs() as logs:
        sink.apply(diff(DESIRED, sink.read()))
    assert set(plugins_by_owner(kong)) == {"tenant|beta"}  # off someone else's consumer
    assert consumer_of(plugins_by_owner(kong)["tenant|beta"]) == beta
    deleted = next(e for e in logs if e["event"] == "sink.write" and e["op"] == "delete")
    assert "which has custom_id 'someone-else' now" in deleted["why"][0]
    assert "no Kong consumer" in sink.pending[A("tenant/acme/requests_per_minute")]
    patch_consumer(kong, acme, custom_id="acme")  # put back: written again
    converge(sink, DESIRED)
    assert consumer_of(plugins_by_owner(kong)["tenant|acme"]) == acme
    assert sink.pending == {}


def test_a_moved_username_is_followed_too(kong: KongAdmin, make_sink: SinkFactory) -> None:
    old = add_consumer(kong, username="acme")
    sink = make_sink(kong, consumer_match="username")
    desired = {A("tenant/acme/requests_per_minute"): 60.0}
    converge(sink, desired)
    patch_consumer(kong, old, username="acme-old")
    new = add_consumer(kong, username="acme")
    converge(sink, desired)
    assert consumer_of(plugins_by_owner(kong)["tenant|acme"]) == new


def test_a_stale_duplicate_beside_the_tenants_own_plugin_is_removed(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    # Left by an older Governor, which kept the old consumer's id: a plugin for acme on a
    # consumer that is no longer acme's, beside the one on acme's consumer. Reading it as
    # foreign left it there, limiting someone else with acme's limit.
    old = add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    converge(sink, ACME)
    patch_consumer(kong, old, custom_id="former-acme")
    new = add_consumer(kong, custom_id="acme")
    stale = plugins_by_owner(kong)["tenant|acme"]
    with admin_client(kong) as operator:
        copy = {k: stale[k] for k in ("name", "config", "tags")}
        assert operator.post("/plugins", json={**copy, "consumer": {"id": new}}).status_code == 201
    state = sink.read()
    assert state.foreign == ()
    assert dict(state) == ACME  # the one on acme's consumer
    converge(sink, ACME)
    assert [consumer_of(p) for p in kong.entities("plugins")] == [new]


def test_a_failed_move_is_retried_on_the_next_pass(kong: KongAdmin, make_sink: SinkFactory) -> None:
    old = add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    converge(sink, ACME)
    patch_consumer(kong, old, custom_id="acme-old")
    new = add_consumer(kong, custom_id="acme")
    answers = iter([503])  # Kong fails the move once
    kong.before = lambda method, path: next(answers, None) if method == "PATCH" else None
    with pytest.raises(SinkError, match="answered 503"):
        sink.apply(diff(ACME, sink.read()))
    assert consumer_of(plugins_by_owner(kong)["tenant|acme"]) == old  # untouched, not half
    converge(sink, ACME)
    assert consumer_of(plugins_by_owner(kong)["tenant|acme"]) == new


def test_many_consumers_are_checked_one_by_one_not_listed(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    for i in range(12):
        add_consumer(kong, custom_id=f"user-{i}")
    acme = add_consumer(kong, custom_id="acme")
    sink = make_sink(kong, page_size=3)
    desired = {A("tenant/acme/requests_per_minute"): 60.0}
    converge(sink, desired)
    before = len(kong.requests)
    sink.apply(diff(desired, sink.read()))
    # 13 consumers are 5 pages; one Governor plugin is one GET of its consumer.
    assert [r.path.partition("?")[0] for r in kong.requests[before:]] == [
        "/plugins",
        f"/consumers/{acme}",
    ]
    patch_consumer(kong, acme, custom_id="acme-old")  # and that GET sees a hand edit
    assert dict(sink.read()) == {}


GHOST = A("tenant/ghost/requests_per_minute")


def test_a_waiting_tenants_limit_is_not_read_as_in_force(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    # The read is "the value in force": a limit Kong does not hold (its tenant has no
    # consumer, so it was never written) must not be read as held, tick after tick.
    add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    desired = {**ACME, GHOST: 60.0}
    for _ in range(2):
        sink.apply(diff(desired, sink.read()))
    state = sink.read()
    assert set(plugins_by_owner(kong)) == {"tenant|acme"}
    assert dict(state) == ACME
    assert dict(state.written) == ACME  # nor as written by Governor
    assert state.drift == []
    assert "tenant 'ghost' has no Kong consumer with custom_id 'ghost'" in sink.pending[GHOST]
    add_consumer(kong, custom_id="ghost")
    assert diff(desired, sink.read()) == [Change(GHOST, None, 60.0)]  # still to be written
    sink.apply(diff(desired, sink.read()))
    assert dict(sink.read()) == desired
    assert plugins_by_owner(kong)["tenant|ghost"]["config"]["minute"] == 60
    assert sink.pending == {}


def test_an_apply_holds_a_waiting_limit_back_and_verifies_the_rest(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    add_consumer(kong, custom_id="acme")
    sink = make_sink(kong)
    acme, ghost = (
        Change(A("tenant/acme/requests_per_minute"), None, 600.0),
        Change(GHOST, None, 6.0),
    )
    result = sink.apply([acme, ghost])
    assert result.applied == (acme,)
    assert result.waiting == (ghost,)  # not written: neither applied nor a verify failure
    assert result.verified
    again = sink.apply(diff({**ACME, GHOST: 6.0}, sink.read()))  # nothing to write
    assert (again.applied, again.waiting, again.version) == ((), (ghost,), result.version)


def test_a_plan_limit_is_in_force_where_a_member_holds_it_and_waits_where_none_can(
    kong: KongAdmin, make_sink: SinkFactory
) -> None:
    # No consumer groups: gold's limit is folded into each member's consumer plugin. ghost
    # has no consumer; acme, on gold too, holds gold's limit; nobody can hold silver's.
    add_consumer(kong, custom_id="acme")
    sink = make_sink(kong, Registry(acme="gold", ghost="gold", other="silver"))
    gold, silver = A("plan/gold/requests_per_minute"), A("plan/silver/requests_per_minute")
    own = A("tenant/ghost/requests_per_second")
    desired = {gold: 600.0, silver: 60.0, own: 5.0}
    for _ in range(2):
        result = sink.apply(diff(desired, sink.read()))
    assert dict(sink.read()) == {gold: 600.0}
    assert {c.address for c in result.waiting} == {silver, own}
    # pending lists what a waiting tenant's plugin would carry, with why: gold's too.
    assert set(sink.pending) == {gold, silver, own}
    assert "tenant 'ghost' has no Kong consumer" in sink.pending[gold]
    assert "tenant 'other' has no Kong consumer" in sink.pending[silver]


def test_the_journal_records_a_waiting_limit_when_kong_holds_it_not_before(
    kong: KongAdmin, make_sink: SinkFactory, db: redis.Redis[str]
) -> None:
    # The reconciler journals what the read says changed: while ghost's limit waits, no
    # `limit.changed` claims it was set, and the tick that writes it journals it once.
    keys = KeySchema()
    journal = Journal(db, keys, JournalSettings())
    reconciler = Reconciler(make_sink(kong), journal, name="kong")
    wanted = {GHOST: Decision(GHOST, 60.0, Source.BASELINE, None, "Limits/ghost")}
    waiting = Change(GHOST, None, 60.0)
    reports = [reconciler.tick(wanted, tick=tick, policy_version="v1") for tick in (1, 2)]
    assert journal.flush()
    assert read_events(db, keys) == []
    assert [(r.changes, r.result and r.result.waiting) for r in reports] == [((), (waiting,))] * 2
    add_consumer(kong, custom_id="ghost")
    for tick in (3, 4):
        reconciler.tick(wanted, tick=tick, policy_version="v1")
    assert journal.flush()
    events = [
        (e.event.kind, e.event.address, e.event.new, e.event.tick) for e in read_events(db, keys)
    ]
    assert events == [("limit.changed", str(GHOST), 60.0, 3)]
    assert plugins_by_owner(kong)["tenant|ghost"]["config"]["minute"] == 60
