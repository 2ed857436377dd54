"""Contract tests of the ConfigMap sink: the whole limit document in one ConfigMap, written
by merge patch with its resourceVersion, versioned, drift from a hand edit, ownership."""

from __future__ import annotations

import json
from typing import Any

import pytest

from controller.changes import Change, Drift, diff
from controller.errors import SinkError
from controller.model import Address
from controller.sinks.configmap import LEDGER_KEY, LIMITS_KEY, ConfigMapSink
from tests.kubernetes_sink.conftest import NAMESPACE
from tests.support.kube_api import CONFIG_MAPS, MERGE_PATCHES, KubeApi
from tests.support.sink_ticks import converge

A = Address.parse
DESIRED = {  # every limit kind: nothing here is Kong-specific
    A("global/requests_per_second"): 500.0,
    A("plan/gold/tokens_per_minute"): 90000.0,
    A("tenant/acme/tokens_per_day"): 1.5e6,
    A("user/acme/alice/requests_per_minute@gpt-4"): 7.5,
}


def stored(kube: KubeApi) -> dict[str, Any]:
    found = kube.get(CONFIG_MAPS, NAMESPACE, "governor-limits")
    assert found is not None
    return found


def test_the_document_holds_every_limit_and_a_version(
    kube: KubeApi, configmap_sink: ConfigMapSink
) -> None:
    converge(configmap_sink, DESIRED)
    configmap = stored(kube)
    assert configmap["apiVersion"] == "v1"
    assert configmap["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "governor"
    document = json.loads(configmap["data"][LIMITS_KEY])
    assert document == {
        "version": 1,
        "limits": {
            "global/requests_per_second": 500,
            "plan/gold/tokens_per_minute": 90000,
            "tenant/acme/tokens_per_day": 1500000,
            "user/acme/alice/requests_per_minute@gpt-4": 7.5,
        },
    }
    assert dict(configmap_sink.read()) == DESIRED
    assert configmap_sink.read().as_json() == document  # the `limits get --json` shape


def test_only_changes_write_and_each_write_bumps_the_version(
    kube: KubeApi, configmap_sink: ConfigMapSink
) -> None:
    converge(configmap_sink, DESIRED)
    before = len(kube.requests)
    for _ in range(3):
        result = configmap_sink.apply(diff(DESIRED, configmap_sink.read()))
        assert (result.applied, result.version) == ((), 1)
    assert {r.method for r in kube.requests[before:]} == {"GET"}
    desired = {**DESIRED, A("global/requests_per_second"): 400.0}
    converge(configmap_sink, desired)
    patches = [r for r in kube.requests if r.method == "PATCH"]
    assert [(p.status, p.content_type) for p in patches] == [(200, MERGE_PATCHES[0])]
    assert json.loads(stored(kube)["data"][LIMITS_KEY])["version"] == 2


def test_a_hand_edit_is_drift_and_foreign_entries_are_kept(
    kube: KubeApi, configmap_sink: ConfigMapSink
) -> None:
    converge(configmap_sink, DESIRED)
    configmap = stored(kube)
    document = json.loads(configmap["data"][LIMITS_KEY])
    document["limits"]["global/requests_per_second"] = 9999
    document["limits"]["not an address"] = 1
    configmap["data"][LIMITS_KEY] = json.dumps(document)
    kube.put_object(CONFIG_MAPS, NAMESPACE, configmap)
    state = configmap_sink.read()
    assert state.drift == [Drift(A("global/requests_per_second"), 500.0, 9999.0)]
    assert state.foreign == (f"{LIMITS_KEY} 'not an address'",)
    assert converge(configmap_sink, DESIRED) == [
        Change(A("global/requests_per_second"), 9999.0, 500.0)
    ]
    limits = json.loads(stored(kube)["data"][LIMITS_KEY])["limits"]
    assert limits["global/requests_per_second"] == 500
    assert limits["not an address"] == 1  # not Governor's to remove
    ledger = json.loads(stored(kube)["data"][LEDGER_KEY])["limits"]
    assert "not an address" not in ledger
    assert configmap_sink.read().drift == []


def test_a_stale_resource_version_is_retried(kube: KubeApi, configmap_sink: ConfigMapSink) -> None:
    converge(configmap_sink, DESIRED)
    once = iter([True])

    def concurrent_writer(method: str, path: str) -> None:
        if method == "PATCH" and next(once, False):
            configmap = stored(kube)
            configmap["metadata"].setdefault("annotations", {})["note"] = "by hand"
            kube.put_object(CONFIG_MAPS, NAMESPACE, configmap)

    kube.before = concurrent_writer
    result = configmap_sink.apply([Change(A("global/requests_per_second"), 500.0, 450.0)])
    assert result.verified
    assert kube.statuses("PATCH") == [409, 200]
    assert stored(kube)["metadata"]["annotations"]["note"] == "by hand"
    assert (
        json.loads(stored(kube)["data"][LIMITS_KEY])["limits"]["global/requests_per_second"] == 450
    )


def test_a_configmap_governor_does_not_own_is_refused(
    kube: KubeApi, configmap_sink: ConfigMapSink
) -> None:
    kube.put_object(
        CONFIG_MAPS, NAMESPACE, {"metadata": {"name": "governor-limits"}, "data": {"a": "b"}}
    )
    with pytest.raises(SinkError, match="GOVERNOR_KUBERNETES_SINK__CONFIGMAP_NAME"):
        configmap_sink.check()
    with pytest.raises(SinkError, match="not Governor's"):
        configmap_sink.apply([Change(A("global/requests_per_second"), None, 1.0)])
    assert stored(kube)["data"] == {"a": "b"}
