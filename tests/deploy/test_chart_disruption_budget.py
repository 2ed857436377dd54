"""A PodDisruptionBudget no eviction can satisfy blocks every node drain forever: `kubectl drain`
retries the eviction until it times out, and the node is never emptied. The chart refuses such a
budget when it renders, naming the value and the fix: `minAvailable` at or above the replica
count, a `minAvailable` percentage that Kubernetes rounds up to every replica, `maxUnavailable`
0 or 0%. With the gateway's autoscaler the floor is `gateway.autoscaling.minReplicas`. A budget
that leaves a pod evictable renders, and is valid Kubernetes."""

from __future__ import annotations

from typing import Any

import jsonschema
import kubernetes_validate
import pytest
from helm_python.errors import HelmRenderError

from tests.deploy.chart import KUBE_VERSIONS, Manifest, manifests, of_kind, render
from tests.deploy.crds import CRD_SCHEMAS

GATEWAY = {"enabled": True, "upstream": "http://m:8000"}
CPU = {"requests": {"cpu": "500m"}}  # an autoscaler needs it


def controller(replicas: int, **budget: object) -> dict[str, Any]:
    """The controller with `replicas` pods and a budget (its defaults overridden by `budget`)."""
    return {"replicaCount": replicas, "podDisruptionBudget": {"enabled": True, **budget}}


def gateway(replicas: int, **budget: object) -> dict[str, Any]:
    """The gateway with `replicas` pods and a budget; the controller's stays off."""
    return {
        "gateway": {
            **GATEWAY,
            "replicaCount": replicas,
            "podDisruptionBudget": {"enabled": True, **budget},
        }
    }


def autoscaled(replicas: int, min_replicas: int, **budget: object) -> dict[str, Any]:
    """The gateway under an autoscaler of `min_replicas` (`replicas` is then not rendered)."""
    values = gateway(replicas, **budget)
    values["gateway"]["resources"] = CPU
    values["gateway"]["autoscaling"] = {"enabled": True, "minReplicas": min_replicas}
    return values


def min_available_rounded_up(percent: int, replicas: int) -> int:
    """What Kubernetes' disruption controller makes of `minAvailable: <percent>%`
    (intstr.GetScaledValueFromIntOrPercent with roundUp: a ceiling)."""
    return -(-percent * replicas // 100)


def refusal(values: dict[str, Any]) -> str:
    with pytest.raises(HelmRenderError) as refused:
        render(values)
    return str(refused.value)


def budget_specs(values: dict[str, Any], part: str) -> list[dict[str, Any]]:
    """The rendered budget's bounds (its spec without the selector)."""
    docs = manifests(render(values))
    return [
        {k: v for k, v in doc["spec"].items() if k != "selector"}
        for doc in of_kind(docs, "PodDisruptionBudget", part)
    ]


REFUSED = [
    pytest.param(
        gateway(2, minAvailable=2),
        [
            "gateway.podDisruptionBudget.minAvailable (2) must be below gateway.replicaCount (2),"
            " or a node drain can never evict a gateway pod: lower it or raise"
            " gateway.replicaCount"
        ],
        id="gateway minAvailable = replicas",
    ),
    pytest.param(
        gateway(2, minAvailable=5),
        ["gateway.podDisruptionBudget.minAvailable (5) must be below gateway.replicaCount (2)"],
        id="gateway minAvailable > replicas",
    ),
    pytest.param(
        gateway(3, minAvailable="3"),  # the schema takes digits as a string; rendered: 3
        ["gateway.podDisruptionBudget.minAvailable (3) must be below gateway.replicaCount (3)"],
        id="gateway minAvailable as a string of digits",
    ),
    pytest.param(
        controller(2, minAvailable=2),
        [
            "podDisruptionBudget.minAvailable (2) must be below replicaCount (2), or a node drain"
            " can never evict a controller pod: lower it or raise replicaCount"
        ],
        id="controller minAvailable = replicas",
    ),
    pytest.param(
        # minimal-values.yaml (one replica, no election) with the budget switched on: the
        # default minAvailable 1 is all of it.
        {**controller(1), "leaderElection": {"enabled": False}},
        ["podDisruptionBudget.minAvailable (1) must be below replicaCount (1)"],
        id="controller single replica with the default budget",
    ),
    pytest.param(
        controller(2, minAvailable="100%"),
        [
            "podDisruptionBudget.minAvailable (100%) must be below replicaCount (2) once"
            " Kubernetes rounds it up (it comes to 2), or a node drain can never evict a controller"
            " pod: lower it to at most 50% or raise replicaCount"
        ],
        id="controller minAvailable 100%",
    ),
    pytest.param(
        gateway(2, minAvailable="60%"),
        [
            "gateway.podDisruptionBudget.minAvailable (60%) must be below gateway.replicaCount"
            " (2) once Kubernetes rounds it up (it comes to 2)",
            "lower it to at most 50% or raise gateway.replicaCount",
        ],
        id="gateway minAvailable 60% of 2 rounds up to 2",
    ),
    # 0 is a value, not "unset": read as unset it would render minAvailable 1, and pass.
    *(
        pytest.param(
            values,
            [
                f"{path}.maxUnavailable ({shown}) lets no {pod} pod be evicted, so a node drain"
                " can never finish: set it to 1 or more (or a percentage above 0%), or clear it"
                f" and set {path}.minAvailable below {replicas} (2)"
            ],
            id=f"{pod} maxUnavailable {shown}",
        )
        for zero, shown in ((0, "0"), ("0%", "0%"))
        for values, path, pod, replicas in (
            (
                controller(2, maxUnavailable=zero),
                "podDisruptionBudget",
                "controller",
                "replicaCount",
            ),
            (
                gateway(2, maxUnavailable=zero),
                "gateway.podDisruptionBudget",
                "gateway",
                "gateway.replicaCount",
            ),
        )
    ),
    pytest.param(
        # 5 gateways in replicaCount, but the autoscaler may bring them down to 2.
        autoscaled(5, 2, minAvailable=2),
        [
            "gateway.podDisruptionBudget.minAvailable (2) must be below"
            " gateway.autoscaling.minReplicas (2)",
            "lower it or raise gateway.autoscaling.minReplicas",
        ],
        id="autoscaled gateway minAvailable = minReplicas",
    ),
    pytest.param(
        autoscaled(5, 3, minAvailable="100%"),
        [
            "gateway.podDisruptionBudget.minAvailable (100%) must be below"
            " gateway.autoscaling.minReplicas (3) once Kubernetes rounds it up (it comes to 3)"
        ],
        id="autoscaled gateway minAvailable 100%",
    ),
    pytest.param(
        autoscaled(5, 3, maxUnavailable=0),
        [
            "gateway.podDisruptionBudget.maxUnavailable (0) lets no gateway pod be evicted",
            "below gateway.autoscaling.minReplicas (3)",
        ],
        id="autoscaled gateway maxUnavailable 0",
    ),
]


@pytest.mark.parametrize(("values", "named"), REFUSED)
def test_a_budget_that_blocks_every_drain_stops_the_render_naming_the_value_and_the_fix(
    values: dict[str, Any], named: list[str]
) -> None:
    message = refusal(values)
    for text in named:
        assert text in message


ACCEPTED = [
    pytest.param(controller(2), "controller", {"minAvailable": 1}, id="controller defaults"),
    pytest.param(gateway(2), "gateway", {"minAvailable": 1}, id="gateway defaults"),
    pytest.param(
        controller(3, minAvailable="66%"), "controller", {"minAvailable": "66%"}, id="66% of 3"
    ),
    pytest.param(
        gateway(3, maxUnavailable=1), "gateway", {"maxUnavailable": 1}, id="maxUnavailable 1"
    ),
    pytest.param(
        # 1% of 2 is 0.02 pods, rounded up to 1: one pod may go.
        controller(2, maxUnavailable="1%"),
        "controller",
        {"maxUnavailable": "1%"},
        id="1% of 2",
    ),
    pytest.param(
        # minAvailable 5 of 2 gateways would be refused were it read: a set maxUnavailable is
        # what renders, so it alone is checked.
        gateway(2, minAvailable=5, maxUnavailable="50%"),
        "gateway",
        {"maxUnavailable": "50%"},
        id="maxUnavailable wins over minAvailable",
    ),
    pytest.param(
        # replicaCount 1 is not rendered under an autoscaler: minReplicas 3 is the floor.
        autoscaled(1, 3, minAvailable=2),
        "gateway",
        {"minAvailable": 2},
        id="autoscaled gateway: minReplicas, not replicaCount",
    ),
]


def validate(docs: list[Manifest]) -> None:
    """What test_chart_render checks of every scenario: valid for each Kubernetes version."""
    for kube_version in KUBE_VERSIONS:
        for doc in docs:
            schema = CRD_SCHEMAS.get(doc["kind"])
            if schema is not None:
                jsonschema.validate(doc, schema)
            else:
                kubernetes_validate.validate(doc, kube_version, strict=True)


@pytest.mark.parametrize(("values", "part", "bounds"), ACCEPTED)
def test_a_budget_that_leaves_a_pod_evictable_renders_as_valid_kubernetes(
    values: dict[str, Any], part: str, bounds: dict[str, Any]
) -> None:
    docs = manifests(render(values))
    budgets = of_kind(docs, "PodDisruptionBudget", part)
    assert len(budgets) == 1
    assert {k: v for k, v in budgets[0]["spec"].items() if k != "selector"} == bounds
    validate(docs)


@pytest.mark.parametrize("part", ["controller", "gateway"])
@pytest.mark.parametrize("replicas", [1, 2, 3, 5])
def test_an_integer_min_available_is_refused_from_the_replica_count_up(
    part: str, replicas: int
) -> None:
    build = controller if part == "controller" else gateway
    name = "replicaCount" if part == "controller" else "gateway.replicaCount"
    for min_available in range(replicas + 2):
        values = build(replicas, minAvailable=min_available)
        if min_available >= replicas:
            assert f"must be below {name} ({replicas})" in refusal(values), min_available
        else:
            assert budget_specs(values, part) == [{"minAvailable": min_available}]


PERCENTS = [0, 1, 20, 25, 33, 34, 49, 50, 51, 60, 66, 67, 74, 75, 76, 80, 81, 99, 100]


@pytest.mark.parametrize("replicas", [1, 2, 3, 4, 5])
def test_a_min_available_percentage_is_refused_when_it_rounds_up_to_every_replica(
    replicas: int,
) -> None:
    """Kubernetes rounds a minAvailable percentage up: with 2 replicas 51% is both pods, with 3
    67% is all three; with 1 any percentage above 0% is the one pod."""
    refused = []
    for percent in PERCENTS:
        values = controller(replicas, minAvailable=f"{percent}%")
        if min_available_rounded_up(percent, replicas) >= replicas:
            message = refusal(values)
            assert f"minAvailable ({percent}%) must be below replicaCount ({replicas})" in message
            refused.append(percent)
        else:
            assert budget_specs(values, "controller") == [{"minAvailable": f"{percent}%"}]
    # The grid above straddles each boundary: something is refused, and 0% never is.
    assert refused
    assert 0 not in refused
    assert 100 in refused
