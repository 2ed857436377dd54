"""The chart's Role grants what the Kubernetes sinks use (controller.sinks.kubernetes.RBAC_VERBS,
docs/sinks.md#rbac), rendered with Helm's own engine."""

from __future__ import annotations

from controller.sinks.kubernetes import RBAC_VERBS
from tests.deploy.chart import one, rendered_scenario


def test_the_charts_role_covers_the_sinks_verbs() -> None:
    docs = rendered_scenario("kubernetes-sink-values.yaml")[1]
    rules = {rule["resources"][0]: rule for rule in one(docs, "Role")["rules"]}
    for resource, group in (("kongplugins", "configuration.konghq.com"), ("configmaps", "")):
        assert rules[resource]["apiGroups"] == [group]
        missing = set(RBAC_VERBS[resource]) - set(rules[resource]["verbs"])
        assert not missing, f"the chart's Role lacks {sorted(missing)} on {resource}"
