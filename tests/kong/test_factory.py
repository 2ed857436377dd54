"""`build_sinks`: the sinks named in GOVERNOR_CONTROLLER__SINKS, wired to Governor's Redis (the
tenant registry, the leader fence) — and each reconciled with its own drift report."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest
import redis
from kubernetes import client as k8s
from pydantic import ValidationError

from controller.changes import Change
from controller.contract.fence import Fence, FencedError
from controller.contract.keys import KeySchema
from controller.control.overrides import ControlStore
from controller.control.reconciler import Reconciler
from controller.errors import ConfigurationError
from controller.journal.reader import read_events
from controller.journal.writer import Journal
from controller.model import Address, Decision, Source
from controller.settings import JournalSettings, Settings
from controller.sinks.configmap import ConfigMapSink
from controller.sinks.factory import LimitFilter, build_sinks, sink_label, split_supported
from controller.sinks.kong import KongSink
from controller.sinks.kubernetes import KubernetesSink
from controller.sinks.redis import RedisSink
from tests.kong.conftest import add_consumer, admin_client, plugins_by_owner
from tests.kong.kong_admin import KongAdmin
from tests.support.kube_api import CONFIG_MAPS, KONG_PLUGINS, KubeApi

A = Address.parse


@pytest.fixture
def kube_api() -> Iterator[Any]:
    server = KubeApi(resources=(KONG_PLUGINS, CONFIG_MAPS)).start()
    configuration = k8s.Configuration()
    configuration.host = server.url
    with k8s.ApiClient(configuration) as api:
        yield api
    server.stop()


def registry(db: redis.Redis[str]) -> Callable[[], Mapping[str, str]]:
    """The tenant registry the daemon hands the sinks."""
    return ControlStore(db, KeySchema()).tenants


def settings(monkeypatch: pytest.MonkeyPatch, **env: str) -> Settings:
    for name, value in env.items():
        monkeypatch.setenv(f"GOVERNOR_{name}", value)
    return Settings()


def decisions(values: dict[str, float]) -> dict[Address, Decision]:
    return {
        A(text): Decision(A(text), value, Source.BASELINE, None, "test")
        for text, value in values.items()
    }


def test_every_named_sink_is_built_in_order(
    monkeypatch: pytest.MonkeyPatch, db: redis.Redis[str], kong: KongAdmin, kube_api: Any
) -> None:
    configured = settings(
        monkeypatch,
        CONTROLLER__SINKS="redis, kong,kubernetes,configmap",
        KONG__ADMIN_URL=kong.url,
        KUBERNETES_SINK__NAMESPACE="kong",
    )
    sinks = build_sinks(configured, db, registry=registry(db), kube_api=kube_api)
    assert [type(s) for s in sinks] == [RedisSink, KongSink, KubernetesSink, ConfigMapSink]
    assert [sink_label(s) for s in sinks] == ["redis", "kong", "kubernetes", "configmap"]
    assert [isinstance(s, LimitFilter) for s in sinks] == [False, True, True, False]
    wanted = decisions(
        {"tenant/acme/tokens_per_minute": 9000, "tenant/acme/requests_per_minute": 60}
    )
    kept, skipped = split_supported(sinks[1], wanted)
    assert list(kept) == [A("tenant/acme/requests_per_minute")]
    assert "AI Rate Limiting Advanced" in skipped[A("tenant/acme/tokens_per_minute")]
    assert split_supported(sinks[0], wanted) == (wanted, {})
    assert split_supported(sinks[3], wanted) == (wanted, {})
    for sink in sinks:
        sink.check()
    for sink in sinks[1:]:
        assert isinstance(sink, KongSink | KubernetesSink | ConfigMapSink)
        sink.close()


def test_settings_name_what_to_fix(monkeypatch: pytest.MonkeyPatch, db: redis.Redis[str]) -> None:
    assert Settings().controller.sinks == ["redis"]
    assert settings(monkeypatch, CONTROLLER__SINKS='["redis", "kong"]').controller.sinks == [
        "redis",
        "kong",
    ]
    with pytest.raises(ConfigurationError, match="GOVERNOR_KONG__ADMIN_URL"):
        build_sinks(
            settings(monkeypatch, CONTROLLER__SINKS="kong"),
            db,
            registry=registry(db),
        )
    monkeypatch.setenv("GOVERNOR_CONTROLLER__SINKS", "redis,nginx")
    with pytest.raises(ValidationError, match="'nginx' is not one of"):
        Settings()
    monkeypatch.setenv("GOVERNOR_CONTROLLER__SINKS", "redis,redis")
    with pytest.raises(ValidationError, match="twice"):
        Settings()
    monkeypatch.setenv("GOVERNOR_CONTROLLER__SINKS", "redis")
    monkeypatch.setenv("GOVERNOR_KONG__POLICY", "redis")
    with pytest.raises(ValidationError, match="GOVERNOR_KONG__REDIS_HOST"):
        Settings()


def test_the_kong_sink_reads_the_tenant_registry_and_keeps_its_own_drift_report(
    monkeypatch: pytest.MonkeyPatch, db: redis.Redis[str], kong: KongAdmin
) -> None:
    for tenant in ("acme", "beta"):
        add_consumer(kong, custom_id=tenant)
    control = ControlStore(db, KeySchema("governor"))
    control.set_tenant("acme", "gold")
    control.set_tenant("beta", "gold")
    configured = settings(monkeypatch, CONTROLLER__SINKS="redis,kong", KONG__ADMIN_URL=kong.url)
    redis_sink, kong_sink = build_sinks(configured, db, registry=registry(db))
    journal = Journal(db, KeySchema("governor"), JournalSettings())
    reconcilers = [Reconciler(sink, journal) for sink in (redis_sink, kong_sink)]
    wanted = decisions({"plan/gold/requests_per_minute": 600.0, "global/requests_per_second": 50})
    for tick in (1, 2):
        reports = [r.tick(wanted, tick=tick, policy_version="v1") for r in reconcilers]
    assert [len(r.changes) for r in reports] == [0, 0]
    assert {k: p["config"]["minute"] for k, p in plugins_by_owner(kong).items()} == {
        "tenant|acme": 600,
        "tenant|beta": 600,
        "global": None,
    }
    beta = plugins_by_owner(kong)["tenant|beta"]
    with admin_client(kong) as operator:
        operator.patch(f"/plugins/{beta['id']}", json={"config": {"minute": 6000}})
    reports = [r.tick(wanted, tick=3, policy_version="v1") for r in reconcilers]
    assert [len(r.drift) for r in reports] == [0, 1]  # only Kong was edited
    drift = [e for e in read_events(db, KeySchema("governor")) if e.event.kind == "limit.drift"]
    assert [(e.event.address, e.event.old, e.event.new) for e in drift] == [
        ("plan/gold/requests_per_minute", 600.0, 6000.0)
    ]
    assert plugins_by_owner(kong)["tenant|beta"]["config"]["minute"] == 600


def test_a_deposed_leader_writes_nothing_to_kong(
    monkeypatch: pytest.MonkeyPatch, db: redis.Redis[str], kong: KongAdmin
) -> None:
    add_consumer(kong, custom_id="acme")
    configured = settings(monkeypatch, CONTROLLER__SINKS="kong", KONG__ADMIN_URL=kong.url)
    (sink,) = build_sinks(configured, db, registry=registry(db))
    assert isinstance(sink, KongSink)
    sink.fence = lambda: Fence("governor:leader", "me#1")
    db.set("governor:leader", "someone-else#2")
    change = Change(A("tenant/acme/requests_per_minute"), None, 60.0)
    writes = kong.writes()
    with pytest.raises(FencedError, match="no longer holds the leader lock"):
        sink.apply([change])
    assert kong.writes() == writes
    db.set("governor:leader", "me#1")
    assert sink.apply([change]).verified
    assert kong.writes() == writes + 1
