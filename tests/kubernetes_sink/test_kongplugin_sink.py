"""Contract tests of the Kubernetes sink: the real `kubernetes` client against a loopback API
that follows Kubernetes' (KongPlugin custom objects, merge patches, 409 on a stale
resourceVersion). Converge, write nothing when nothing changed, drift, ownership."""

from __future__ import annotations

import json

import pytest
from kubernetes import client as k8s
from structlog.testing import capture_logs

from controller.changes import Change, Drift, diff
from controller.errors import SinkError
from controller.model import Address
from controller.settings import KongSettings, KubernetesSinkSettings
from controller.sinks.kong_layout import Owner, OwnerKind
from controller.sinks.kubernetes import KubernetesSink, object_name
from tests.kubernetes_sink.conftest import NAMESPACE, PluginSinkFactory, objects
from tests.support.kube_api import CONFIG_MAPS, KONG_PLUGINS, MERGE_PATCHES, KubeApi
from tests.support.sink_ticks import Registry, converge

A = Address.parse
DESIRED = {
    A("global/requests_per_second"): 500.0,
    A("plan/gold/requests_per_minute"): 600.0,
    A("tenant/acme/requests_per_second"): 5.0,
}
REGISTRY = {"acme": "gold", "beta": "gold", "carol": "free"}


@pytest.fixture
def converged(make_sink: PluginSinkFactory) -> KubernetesSink:
    """A sink after converging DESIRED with REGISTRY."""
    sink = make_sink(Registry(REGISTRY))
    converge(sink, DESIRED)
    return sink


def test_the_sink_writes_kongplugins_the_ingress_controller_reads(
    kube: KubeApi, converged: KubernetesSink
) -> None:
    sink = converged
    found = objects(kube)
    assert set(found) == {"governor-global", "governor-tenant-acme", "governor-tenant-beta"}
    acme = found["governor-tenant-acme"]
    assert acme["apiVersion"] == "configuration.konghq.com/v1"
    assert acme["kind"] == "KongPlugin"
    assert acme["plugin"] == "rate-limiting"
    assert acme["config"] == {
        "second": 5,
        "minute": 600,  # the plan's, folded in: Kong runs one instance per consumer
        "limit_by": "consumer",
        "policy": "local",
        "fault_tolerant": True,
        "hide_client_headers": False,
    }
    assert acme["metadata"]["labels"] == {
        "app.kubernetes.io/managed-by": "governor",
        "governor.io/owner": "governor",
    }
    annotations = acme["metadata"]["annotations"]
    assert annotations["governor.io/scope"] == "tenant/acme"
    assert json.loads(annotations["governor.io/written"]) == {
        "plan/gold/requests_per_minute": 600,
        "tenant/acme/requests_per_second": 5,
    }
    assert found["governor-tenant-beta"]["config"]["minute"] == 600
    assert found["governor-global"]["config"]["limit_by"] == "service"
    assert dict(sink.read()) == DESIRED


def test_nothing_is_written_when_nothing_changed(kube: KubeApi, converged: KubernetesSink) -> None:
    sink = converged
    before = len(kube.requests)
    version = sink.read().version
    for _ in range(3):
        result = sink.apply(diff(DESIRED, sink.read()))
        assert (result.applied, result.version) == ((), version)
    assert [r.method for r in kube.requests[before:]] == ["GET"] * 4
    assert all("labelSelector=" in r.path for r in kube.requests[before:])


def test_a_change_is_one_merge_patch_with_the_resource_version(
    kube: KubeApi, converged: KubernetesSink
) -> None:
    sink = converged
    before = len(kube.requests)
    desired = {**DESIRED, A("tenant/acme/requests_per_second"): 8.0}
    del desired[A("global/requests_per_second")]
    assert converge(sink, desired) == [
        Change(A("global/requests_per_second"), 500.0, None),
        Change(A("tenant/acme/requests_per_second"), 5.0, 8.0),
    ]
    writes = [r for r in kube.requests[before:] if r.method != "GET"]
    assert [(r.method, r.status) for r in writes] == [("DELETE", 200), ("PATCH", 200)]
    assert writes[1].content_type == MERGE_PATCHES[0]
    assert "governor-global" not in objects(kube)
    assert objects(kube)["governor-tenant-acme"]["config"]["second"] == 8


def test_a_stale_resource_version_is_re_read_and_retried(
    kube: KubeApi, converged: KubernetesSink
) -> None:
    sink = converged
    state = sink.read()  # Governor read acme's object; then someone else writes it
    acme = objects(kube)["governor-tenant-acme"]
    acme["metadata"]["annotations"]["team"] = "payments"
    edits = iter([acme])

    def concurrent_writer(method: str, path: str) -> None:
        if method == "PATCH":
            other = next(edits, None)
            if other is not None:
                kube.put_object(KONG_PLUGINS, NAMESPACE, other)

    kube.before = concurrent_writer
    desired = {**DESIRED, A("tenant/acme/requests_per_second"): 9.0}
    result = sink.apply(diff(desired, state))
    assert result.verified
    assert kube.statuses("PATCH")[-2:] == [409, 200]
    stored = objects(kube)["governor-tenant-acme"]
    assert stored["config"]["second"] == 9
    assert stored["metadata"]["annotations"]["team"] == "payments"  # another's edit kept


def test_conflicts_that_never_end_are_reported_not_looped(
    kube: KubeApi, make_sink: PluginSinkFactory
) -> None:
    sink = make_sink(Registry(REGISTRY), conflict_retries=2)
    converge(sink, DESIRED)
    state = sink.read()

    def always_first(method: str, path: str) -> None:
        if method == "PATCH":
            kube.put_object(KONG_PLUGINS, NAMESPACE, objects(kube)["governor-tenant-acme"])

    kube.before = always_first
    with capture_logs() as logs:
        result = sink.apply(diff({**DESIRED, A("tenant/acme/requests_per_second"): 9.0}, state))
    assert [c.address for c in result.mismatched] == [A("tenant/acme/requests_per_second")]
    assert kube.statuses("PATCH")[-3:] == [409, 409, 409]
    assert "still a conflict after 2 re-reads" in next(
        e["error"] for e in logs if e["event"] == "sink.write_rejected"
    )


def test_a_hand_edit_is_drift_and_is_reconciled(kube: KubeApi, converged: KubernetesSink) -> None:
    sink = converged
    beta = objects(kube)["governor-tenant-beta"]
    beta["config"]["minute"] = 5000
    kube.put_object(KONG_PLUGINS, NAMESPACE, beta)
    assert sink.read().drift == [Drift(A("plan/gold/requests_per_minute"), 600.0, 5000.0)]
    assert converge(sink, DESIRED) == [Change(A("plan/gold/requests_per_minute"), 5000.0, 600.0)]
    assert objects(kube)["governor-tenant-beta"]["config"]["minute"] == 600
    acme = objects(kube)["governor-tenant-acme"]
    acme["disabled"] = True  # switching it off by hand is drift too
    kube.put_object(KONG_PLUGINS, NAMESPACE, acme)
    assert Drift(A("tenant/acme/requests_per_second"), 5.0, None) in sink.read().drift
    converge(sink, DESIRED)
    assert "disabled" not in objects(kube)["governor-tenant-acme"]


def test_protocols_narrowed_by_hand_are_restored(kube: KubeApi, converged: KubernetesSink) -> None:
    # `protocols: [grpc]` added by hand: the KIC configured acme's plugin for gRPC only (its
    # limit off for HTTP) while Governor read the limit as held and wrote nothing.
    sink = converged
    acme = objects(kube)["governor-tenant-acme"]
    acme["protocols"] = ["grpc"]
    kube.put_object(KONG_PLUGINS, NAMESPACE, acme)
    with capture_logs() as logs:
        assert sink.apply(diff(DESIRED, sink.read())).applied == ()
    write = next(e for e in logs if e["event"] == "sink.write")
    assert (write["owner"], write["why"]) == ("tenant/acme", ["protocols"])
    protocols = objects(kube)["governor-tenant-acme"]["protocols"]
    assert sorted(protocols) == ["grpc", "grpcs", "http", "https"]
    assert sink.apply(diff(DESIRED, sink.read())).applied == ()


def test_an_object_whose_annotations_were_stripped_is_taken_back(
    kube: KubeApi, converged: KubernetesSink
) -> None:
    # Governor's labels and name, annotations stripped by hand (a `kubectl apply` of an old
    # manifest): reported as unreadable, and every create met the 409 and gave up, so the
    # limit was reported unenforced on every tick and never repaired.
    sink = converged
    acme = objects(kube)["governor-tenant-acme"]
    acme["metadata"]["annotations"] = {"team": "payments"}
    acme["config"]["second"] = 50
    kube.put_object(KONG_PLUGINS, NAMESPACE, acme)
    assert any("governor-tenant-acme" in f for f in sink.read().foreign)
    converge(sink, DESIRED)
    stored = objects(kube)["governor-tenant-acme"]
    assert stored["config"]["second"] == 5
    assert stored["metadata"]["annotations"]["governor.io/scope"] == "tenant/acme"
    assert stored["metadata"]["annotations"]["team"] == "payments"
    state = sink.read()
    assert (state.foreign, state.drift) == ((), [])


def test_objects_governor_does_not_own_are_never_touched(
    kube: KubeApi, make_sink: PluginSinkFactory
) -> None:
    theirs = {
        "metadata": {"name": "governor-tenant-acme", "labels": {"team": "payments"}},
        "plugin": "rate-limiting",
        "config": {"hour": 10},
    }
    kube.put_object(KONG_PLUGINS, NAMESPACE, theirs)
    other_owner = {
        "metadata": {
            "name": "governor-global",
            "labels": {"app.kubernetes.io/managed-by": "governor", "governor.io/owner": "blue"},
            "annotations": {"governor.io/scope": "global"},
        },
        "plugin": "rate-limiting",
        "config": {"second": 1},
    }
    kube.put_object(KONG_PLUGINS, NAMESPACE, other_owner)
    sink = make_sink(Registry(REGISTRY))
    assert dict(sink.read()) == {}  # another owner's objects are not even listed
    with capture_logs() as logs:
        result = sink.apply(diff(DESIRED, sink.read()))
    assert {c.address for c in result.mismatched} == {
        A("global/requests_per_second"),
        A("tenant/acme/requests_per_second"),
    }
    errors = [e["error"] for e in logs if e["event"] == "sink.write_rejected"]
    assert len(errors) == 2
    assert all("is not Governor's" in e for e in errors)
    found = objects(kube)
    assert found["governor-tenant-acme"]["config"] == {"hour": 10}
    assert found["governor-global"]["metadata"]["labels"]["governor.io/owner"] == "blue"
    assert found["governor-tenant-beta"]["config"]["minute"] == 600  # its own: written


def test_hostile_ids_get_names_no_other_id_can_take(
    kube: KubeApi, make_sink: PluginSinkFactory
) -> None:
    tenants = ["acme", "ACME", "Acme", "acme.eu", "a:b", "a+b", "a=b", "a~b", "a-b", "x"]
    names = {object_name("governor", Owner(OwnerKind.TENANT, t)) for t in tenants}
    assert len(names) == len(tenants)
    hashed = object_name("governor", Owner(OwnerKind.TENANT, "ACME"))
    assert hashed.startswith("governor-tenant-x.acme.")  # dots: never a clean id's name
    sink = make_sink()
    desired = {A(f"tenant/{t}/requests_per_minute"): 10.0 + i for i, t in enumerate(tenants)}
    converge(sink, desired)
    assert dict(sink.read()) == desired
    found = objects(kube)
    assert {o["metadata"]["annotations"]["governor.io/scope"] for o in found.values()} == {
        f"tenant/{t}" for t in tenants
    }
    # A copy of acme's object under another name is not acme's: reported, left alone.
    copied = found["governor-tenant-acme"]
    copied["metadata"]["name"] = "governor-tenant-a-b"
    kube.put_object(KONG_PLUGINS, NAMESPACE, copied)
    state = sink.read()
    assert any("belongs to governor-tenant-acme" in f for f in state.foreign)


def test_cluster_scoped_plugins_and_the_global_label(
    kube: KubeApi, make_sink: PluginSinkFactory
) -> None:
    kong = KongSettings(policy="redis", redis_host="redis.kong.svc", redis_password="never")
    sink = make_sink(
        Registry(REGISTRY), kong=kong, cluster_scoped=True, redis_password_secret="kong-redis"
    )
    converge(sink, DESIRED)
    assert objects(kube) == {}
    found = objects(kube, cluster=True)
    glob = found["governor-global"]
    assert glob["kind"] == "KongClusterPlugin"
    assert "namespace" not in glob["metadata"]
    assert glob["metadata"]["labels"]["global"] == "true"
    assert "global" not in found["governor-tenant-acme"]["metadata"]["labels"]
    assert glob["config"]["redis"]["host"] == "redis.kong.svc"
    assert "password" not in glob["config"]["redis"]
    assert glob["configPatches"] == [
        {
            "path": "/redis/password",
            "valueFrom": {
                "secretKeyRef": {"name": "kong-redis", "key": "redis-password", "namespace": "kong"}
            },
        }
    ]
    assert "never" not in json.dumps(found)


def test_plan_objects_for_consumer_groups(kube: KubeApi, make_sink: PluginSinkFactory) -> None:
    sink = make_sink(Registry(REGISTRY), consumer_groups=True)
    converge(sink, DESIRED)
    found = objects(kube)
    assert set(found) == {"governor-global", "governor-plan-gold", "governor-tenant-acme"}
    assert found["governor-plan-gold"]["config"]["minute"] == 600
    assert found["governor-tenant-acme"]["config"]["minute"] == 600


def test_check_reports_missing_crds() -> None:
    server = KubeApi(resources=(CONFIG_MAPS,)).start()  # no Kong CRDs installed
    configuration = k8s.Configuration()
    configuration.host = server.url
    try:
        with k8s.ApiClient(configuration) as api:
            sink = KubernetesSink.from_settings(
                KubernetesSinkSettings(), KongSettings(), api, namespace=NAMESPACE
            )
            with pytest.raises(SinkError, match="CRDs installed"):
                sink.check()
    finally:
        server.stop()


def test_a_deposed_leader_does_not_overwrite_the_new_leaders_write_on_a_conflict(
    kube: KubeApi, converged: KubernetesSink, make_sink: PluginSinkFactory
) -> None:
    # The old leader read, then lost the lock mid-tick (its fence check came before); the
    # new leader wrote acme's object. The old leader's patch met a 409, re-read the object
    # and wrote its stale decision over the new leader's.
    stale = converged
    stale_state = stale.read()
    leader = make_sink(Registry(REGISTRY))
    converge(leader, {**DESIRED, A("tenant/acme/requests_per_second"): 7.0})
    with capture_logs() as logs:
        result = stale.apply(
            diff({**DESIRED, A("tenant/acme/requests_per_second"): 3.0}, stale_state)
        )
    assert [c.address for c in result.mismatched] == [A("tenant/acme/requests_per_second")]
    assert objects(kube)["governor-tenant-acme"]["config"]["second"] == 7  # the leader's
    assert "another Governor wrote it" in next(
        e["error"] for e in logs if e["event"] == "sink.write_rejected"
    )
    assert leader.read().drift == []
