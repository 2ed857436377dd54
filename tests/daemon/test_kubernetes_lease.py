"""Contract tests of the Kubernetes Lease elector: the real `kubernetes` client against a
loopback server that follows the coordination.k8s.io/v1 API (tests/support/kube_api.py), a
real Redis for the fence, and virtual time for expiry. No kube-apiserver can run here."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kubernetes import client as k8s

from controller.changes import Change
from controller.contract.fence import FencedError
from controller.contract.keys import KeySchema
from controller.control.leader import KubernetesLease
from controller.model import Address
from controller.sinks.redis import RedisSink
from tests.daemon.harness import ADDRESS, LOCK_KEY, DaemonFactory, daemon_env
from tests.support.kube_api import LEASES, MERGE_PATCHES, KubeApi
from tests.support.prometheus import PrometheusServer, wait_for

pytestmark = pytest.mark.integration

NAMESPACE = "governor-test"
NAME = "governor"
LEASE = 15.0


class Clock:
    """Virtual time for lease expiry."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


class Interleaved:
    """One elector's API client that lets `between` run after its read and before its write:
    the race of two replicas, made deterministic."""

    def __init__(self, api: k8s.CoordinationV1Api, between: Callable[[], object]) -> None:
        self.api = api
        self.between = between

    def read_namespaced_lease(self, name: str, namespace: str) -> Any:
        try:
            return self.api.read_namespaced_lease(name, namespace)
        finally:
            self.between()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.api, name)


@pytest.fixture
def kube_api() -> Iterator[KubeApi]:
    server = KubeApi().start()
    yield server
    server.stop()


@pytest.fixture
def coordination(kube_api: KubeApi) -> Iterator[k8s.CoordinationV1Api]:
    configuration = k8s.Configuration()
    configuration.host = kube_api.url
    with k8s.ApiClient(configuration) as api_client:
        yield k8s.CoordinationV1Api(api_client)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def elector(
    coordination: k8s.CoordinationV1Api, db: redis.Redis[str], clock: Clock
) -> Callable[..., KubernetesLease]:
    def make(identity: str, api: Any = None) -> KubernetesLease:
        return KubernetesLease(
            api or coordination, NAMESPACE, NAME, identity, LEASE, db, LOCK_KEY, clock=clock
        )

    return make


def _spec(kube_api: KubeApi) -> dict[str, Any]:
    lease = kube_api.get(LEASES, NAMESPACE, NAME)
    assert lease is not None
    spec: dict[str, Any] = lease["spec"]
    return spec


def test_one_elector_wins_and_the_other_stands_by(
    kube_api: KubeApi, db: redis.Redis[str], elector: Callable[..., KubernetesLease], clock: Clock
) -> None:
    a, b = elector("a"), elector("b")
    assert a.ensure()
    assert not b.ensure()
    assert b.fence() is None
    spec = _spec(kube_api)
    assert spec["holderIdentity"] == "a"
    assert spec["leaseDurationSeconds"] == LEASE
    assert spec["leaseTransitions"] == 0
    assert db.get(LOCK_KEY) == "a#0"
    assert kube_api.statuses("POST") == [201]

    first = spec["renewTime"]
    clock.now += LEASE - 1
    assert a.ensure()  # renewed: the lease's clock starts again
    assert _spec(kube_api)["renewTime"] != first
    clock.now += LEASE - 1
    assert not b.ensure()  # 28 s after the creation, but only 14 s after the renewal
    assert 0 < db.pttl(LOCK_KEY) <= LEASE * 1000


def test_the_other_takes_over_after_expiry_and_the_deposed_write_is_fenced(
    kube_api: KubeApi, db: redis.Redis[str], elector: Callable[..., KubernetesLease], clock: Clock
) -> None:
    a, b = elector("a"), elector("b")
    assert a.ensure()
    sink = RedisSink(db, KeySchema("governor"))
    sink.fence = a.fence
    address = Address.parse(ADDRESS)
    sink.apply([Change(address, None, 10.0)])

    clock.now += LEASE + 1  # `a` stopped renewing (paused, partitioned)
    assert b.ensure()
    spec = _spec(kube_api)
    assert (spec["holderIdentity"], spec["leaseTransitions"]) == ("b", 1)
    assert db.get(LOCK_KEY) == "b#1"

    with pytest.raises(FencedError):  # `a` has not noticed yet: its late write is refused
        sink.apply([Change(address, 10.0, 1.0)])
    assert sink.stored(address) == 10.0
    assert not a.ensure()  # and on its next try it learns that `b` holds the lease
    assert a.fence() is None


def test_a_409_race_for_an_expired_lease_loses_cleanly(
    kube_api: KubeApi,
    db: redis.Redis[str],
    coordination: k8s.CoordinationV1Api,
    elector: Callable[..., KubernetesLease],
    clock: Clock,
) -> None:
    assert elector("old").ensure()
    clock.now += LEASE + 1
    b = elector("b")
    a = elector("a", Interleaved(coordination, b.ensure))  # b wins between a's read and write

    assert not a.ensure()
    assert a.fence() is None
    assert kube_api.statuses("PUT") == [200, 409]
    assert _spec(kube_api)["holderIdentity"] == "b"
    assert db.get(LOCK_KEY) == "b#1"
    assert b.ensure()  # the winner renews undisturbed


def test_a_409_race_to_create_the_lease_loses_cleanly(
    kube_api: KubeApi,
    db: redis.Redis[str],
    coordination: k8s.CoordinationV1Api,
    elector: Callable[..., KubernetesLease],
) -> None:
    b = elector("b")
    a = elector("a", Interleaved(coordination, b.ensure))  # both saw 404; b creates first

    assert not a.ensure()
    assert kube_api.statuses("POST") == [201, 409]
    assert _spec(kube_api)["holderIdentity"] == "b"
    assert db.get(LOCK_KEY) == "b#0"


def test_release_hands_the_lease_over_at_once(
    kube_api: KubeApi, db: redis.Redis[str], elector: Callable[..., KubernetesLease]
) -> None:
    a, b = elector("a"), elector("b")
    assert a.ensure()
    a.release()
    assert _spec(kube_api).get("holderIdentity") is None
    assert db.get(LOCK_KEY) is None
    assert b.ensure()  # no waiting for the lease duration
    assert _spec(kube_api)["leaseTransitions"] == 1


def test_the_daemon_leads_through_a_lease_from_a_kubeconfig(
    kube_api: KubeApi,
    db: redis.Redis[str],
    redis_server: Any,
    prometheus: PrometheusServer,
    policy_dir: Path,
    daemons: DaemonFactory,
    tmp_path: Path,
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        f"clusters: [{{name: test, cluster: {{server: '{kube_api.url}'}}}}]\n"
        "users: [{name: test, user: {token: not-checked}}]\n"
        "contexts: [{name: test, context: {cluster: test, user: test}}]\n"
    )
    env = daemon_env(
        redis_server.url,
        prometheus.url,
        policy_dir,
        KUBECONFIG=str(kubeconfig),
        GOVERNOR_LEADER__MODE="kubernetes",
        GOVERNOR_LEADER__NAMESPACE=NAMESPACE,
        GOVERNOR_LEADER__IDENTITY="pod-1",
    )
    daemon = daemons("k8s", env)
    daemon.wait_for_metric("governor_leader", 1.0)
    assert daemon.wait_for_log("governor.started")["leader_election"] == "KubernetesLease"
    assert _spec(kube_api)["holderIdentity"] == "pod-1"
    assert db.get(LOCK_KEY) == "pod-1#0"
    wait_for(lambda: db.hget("governor:written", ADDRESS) is not None, "the leader writes")

    assert daemon.terminate() == 0
    assert _spec(kube_api).get("holderIdentity") is None  # stepped down on SIGTERM
    assert db.get(LOCK_KEY) is None


def test_the_fake_api_follows_the_kubernetes_contract(
    kube_api: KubeApi, coordination: k8s.CoordinationV1Api
) -> None:
    """What later contract tests rely on: CRUD, both patch kinds, 404/409 Status bodies."""
    body = k8s.V1Lease(
        metadata=k8s.V1ObjectMeta(name="x"), spec=k8s.V1LeaseSpec(holder_identity="a")
    )
    created: Any = coordination.create_namespaced_lease(NAMESPACE, body)
    assert created.metadata.uid
    listed: Any = coordination.list_namespaced_lease(NAMESPACE)
    assert [item.metadata.name for item in listed.items] == ["x"]
    patched: Any = coordination.patch_namespaced_lease(
        "x", NAMESPACE, [{"op": "replace", "path": "/spec/holderIdentity", "value": "b"}]
    )
    assert patched.spec.holder_identity == "b"
    merged: Any = coordination.patch_namespaced_lease(
        "x", NAMESPACE, {"spec": {"holderIdentity": None}}, _content_type=MERGE_PATCHES[0]
    )
    assert merged.spec.holder_identity is None
    assert int(merged.metadata.resource_version) > int(created.metadata.resource_version)

    created.spec.holder_identity = "stale"
    with pytest.raises(k8s.exceptions.ApiException) as conflict:
        coordination.replace_namespaced_lease("x", NAMESPACE, created)
    assert conflict.value.status == 409
    assert json.loads(str(conflict.value.body))["reason"] == "Conflict"
    coordination.delete_namespaced_lease("x", NAMESPACE)
    with pytest.raises(k8s.exceptions.ApiException) as missing:
        coordination.read_namespaced_lease("x", NAMESPACE)
    assert (missing.value.status, json.loads(str(missing.value.body))["kind"]) == (404, "Status")
