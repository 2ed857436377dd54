"""The chart renders for its defaults and every ci/ scenario, lints strictly, and every
manifest is valid for Kubernetes 1.30 and 1.33 (the Prometheus Operator's CRDs, which
kubernetes-validate does not ship, against minimal schemas of their own)."""

from __future__ import annotations

import re
from typing import Any

import helm_python
import jsonschema
import kubernetes_validate
import pytest

from tests.deploy.chart import (
    CHART,
    KUBE_VERSIONS,
    NAMESPACE,
    Manifest,
    container,
    env,
    manifests,
    of_kind,
    one,
    render,
    rendered_scenario,
    scenario_values,
)
from tests.deploy.crds import CRD_SCHEMAS, SERVICE_MONITOR

CLUSTER_SCOPED = {"ClusterRole", "ClusterRoleBinding"}  # no namespace of their own


def test_the_chart_renders_the_objects_of_an_install(docs: tuple[Manifest, ...]) -> None:
    kinds = {doc["kind"] for doc in docs}
    assert {"Deployment", "ServiceAccount", "Service"} <= kinds
    for doc in docs:
        if doc["kind"] in CLUSTER_SCOPED:
            assert "namespace" not in doc["metadata"], doc["metadata"]["name"]
        else:
            assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        assert len(doc["metadata"]["name"]) <= 63


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_lint_is_clean_in_strict_mode(scenario: str, kube_version: str) -> None:
    report = helm_python.lint(
        CHART,
        scenario_values(scenario),
        strict=True,
        kube_version=f"v{kube_version}",
        namespace=NAMESPACE,
    )
    assert report["errors"] == []
    # Severity 1 is info (e.g. "icon is recommended"); warnings (2) and errors (3) fail.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("kube_version", KUBE_VERSIONS)
def test_every_manifest_is_valid_kubernetes(docs: tuple[Manifest, ...], kube_version: str) -> None:
    validated = 0
    for doc in docs:
        schema = CRD_SCHEMAS.get(doc["kind"])
        if schema is not None:
            jsonschema.validate(doc, schema)  # raises on any violation
        else:  # anything else must be known to kubernetes-validate: no silent skip
            kubernetes_validate.validate(doc, kube_version, strict=True)
        validated += 1
    assert validated == len(docs) > 0


def test_a_misspelt_field_is_caught_by_the_validation() -> None:
    """The validators above reject what a typo in a template would produce."""
    docs = rendered_scenario("production-values.yaml")[1]
    deployment = one(docs, "Deployment")
    broken: dict[str, Any] = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSIONS[0], strict=True)
    monitor = one(docs, "ServiceMonitor")
    endpoint = {**monitor["spec"]["endpoints"][0], "scrapeTimout": "10s"}
    typo = {**monitor, "spec": {**monitor["spec"], "endpoints": [endpoint]}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, SERVICE_MONITOR)


def test_the_security_context_is_hardened(docs: tuple[Manifest, ...]) -> None:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    ctx = container(docs)["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["runAsNonRoot"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert ctx.get("privileged", False) is False
    # A read-only root needs a writable /tmp: an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container(docs)["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_no_resources_by_default_and_probes_on_health_endpoints(
    docs: tuple[Manifest, ...], scenario: str
) -> None:
    main = container(docs)
    if "resources" not in scenario_values(scenario):
        assert "resources" not in main
    ports = {p["name"]: p["containerPort"] for p in main["ports"]}
    assert main["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http-metrics"}
    assert main["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http-metrics"}
    assert str(ports["http-metrics"]) == env(docs)["GOVERNOR_TELEMETRY__PORT"]["value"]
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["targetPort"] == "http-metrics"
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_the_default_install_elects_a_leader_with_a_minimal_role() -> None:
    docs = rendered_scenario("default")[1]
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert env(docs)["GOVERNOR_LEADER__MODE"]["value"] == "kubernetes"
    lease = env(docs)["GOVERNOR_LEADER__LEASE_NAME"]["value"]
    rules = one(docs, "Role")["rules"]
    assert rules == [
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "resourceNames": [lease],
            "verbs": ["get", "update"],
        },
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    ]
    binding = one(docs, "RoleBinding")
    assert binding["roleRef"]["name"] == one(docs, "Role")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == one(docs, "ServiceAccount")["metadata"]["name"]
    pod = deployment["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    for optional in ("ServiceMonitor", "PrometheusRule", "PodDisruptionBudget", "NetworkPolicy"):
        assert of_kind(docs, optional) == [], f"{optional} must be off by default"


def test_without_kubernetes_api_use_there_is_no_role_and_no_token() -> None:
    for scenario in ("minimal-values.yaml", "inline-policies-values.yaml"):
        docs = rendered_scenario(scenario)[1]
        assert of_kind(docs, "Role") == []
        assert of_kind(docs, "RoleBinding") == []
        pod = one(docs, "Deployment")["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
    minimal = rendered_scenario("minimal-values.yaml")[1]
    assert env(minimal)["GOVERNOR_LEADER__MODE"]["value"] == "none"
    assert one(minimal, "Deployment")["spec"]["replicas"] == 1


def test_the_kubernetes_sink_switch_adds_only_its_resources() -> None:
    docs = rendered_scenario("kubernetes-sink-values.yaml")[1]
    rules = {rule["resources"][0]: rule for rule in one(docs, "Role")["rules"]}
    assert rules["kongplugins"]["apiGroups"] == ["configuration.konghq.com"]
    assert rules["configmaps"]["apiGroups"] == [""]
    assert "secrets" not in rules
    assert "*" not in str(rules)
    assert one(docs, "ServiceAccount")["metadata"]["name"] == "limits-writer"
    assert container(docs)["image"].endswith("@sha256:" + "0" * 64)
    assert container(docs)["args"] == ["run", "--dry-run"]


def test_the_production_scenario_turns_on_monitoring_and_protection() -> None:
    docs = rendered_scenario("production-values.yaml")[1]
    monitor = one(docs, "ServiceMonitor")
    service = one(docs, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    budget = one(docs, "PodDisruptionBudget")
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["minAvailable"] == 1
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"][0]["ports"] == [{"port": "http-metrics", "protocol": "TCP"}]
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert {53, 6379, 9090, 443} <= egress_ports


@pytest.mark.parametrize(("allowed", "spec"), [
    ("50%", {"maxUnavailable": "50%"}),
    (1, {"maxUnavailable": 1}),
    ("", {"minAvailable": 1}),
    (None, {"minAvailable": 1}),
])  # fmt: skip
def test_a_set_max_unavailable_is_kept_and_an_unset_one_is_not(
    allowed: object, spec: dict[str, object]
) -> None:
    """`maxUnavailable: 0` once rendered `minAvailable: 1`: with two replicas one could be
    evicted where the operator asked for none. 0 is a value, not "unset" — one no eviction can
    satisfy, so the chart now refuses it naming maxUnavailable (test_chart_disruption_budget)."""
    budget = {"enabled": True, "maxUnavailable": allowed}
    values = {"podDisruptionBudget": budget,
              "gateway": {"enabled": True, "upstream": "http://vllm:8000",
                          "podDisruptionBudget": budget}}  # fmt: skip
    found = [d for d in manifests(render(values)) if d["kind"] == "PodDisruptionBudget"]
    assert len(found) == 2
    for doc in found:
        assert {k: v for k, v in doc["spec"].items() if k != "selector"} == spec


def test_credentials_come_from_secrets_never_from_plain_values(
    docs: tuple[Manifest, ...], scenario: str
) -> None:
    secret_vars = {
        "GOVERNOR_REDIS__URL",
        "GOVERNOR_REDIS__PASSWORD",
        "GOVERNOR_PROMETHEUS__PASSWORD",
        "GOVERNOR_PROMETHEUS__BEARER_TOKEN",
        "GOVERNOR_KONG__ADMIN_TOKEN",
    }
    variables = env(docs)
    assert "GOVERNOR_REDIS__URL" in variables
    secrets = {s["metadata"]["name"]: s for s in of_kind(docs, "Secret")}
    for name in secret_vars & variables.keys():
        assert "value" not in variables[name], f"{name} must not be a plain value"
        ref = variables[name]["valueFrom"]["secretKeyRef"]
        if ref["name"] in secrets:  # the chart's own Secret holds that key
            assert ref["key"] in secrets[ref["name"]]["data"]
    values = scenario_values(scenario)
    rendered_text = str(docs)
    for group in ("redis", "prometheus", "kong"):
        for key in ("password", "bearerToken", "adminToken"):
            secret = values.get(group, {}).get(key)
            if secret:
                assert secret not in rendered_text, f"{group}.{key} leaked unencoded"


def test_an_existing_secret_replaces_the_charts_own() -> None:
    docs = rendered_scenario("existing-secret-values.yaml")[1]
    assert of_kind(docs, "Secret") == []
    variables = env(docs)
    assert variables["GOVERNOR_REDIS__URL"]["valueFrom"]["secretKeyRef"] == {
        "name": "governor-redis",
        "key": "url",
    }
    token = variables["GOVERNOR_PROMETHEUS__BEARER_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token == {
        "name": "governor-prometheus",
        "key": "prometheus-bearer-token",
        "optional": True,
    }
    assert variables["GOVERNOR_KONG__ADMIN_URL"]["value"] == "http://kong-admin.kong.svc:8001"
    assert variables["GOVERNOR_PROMETHEUS__USERNAME"]["value"] == "governor"


def test_a_changed_secret_rolls_the_pods_but_a_policy_change_does_not() -> None:
    base = one(rendered_scenario("default")[1], "Deployment")
    other_secret = one(
        rendered_scenario("production-values.yaml")[1], "Deployment"
    )  # other credentials
    checksum = base["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    assert re.fullmatch(r"[0-9a-f]{64}", checksum)
    assert other_secret["spec"]["template"]["metadata"]["annotations"]["checksum/secret"] != (
        checksum
    )
    inline = one(rendered_scenario("inline-policies-values.yaml")[1], "Deployment")
    annotations = inline["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {"checksum/secret": checksum}  # other policies, same pod template


def test_a_file_the_shared_settings_name_is_mounted_in_every_pod() -> None:
    """rediss:// with a private CA: GOVERNOR_REDIS__CA_FILE (env, shared by the controller and
    the gateway) names a file from extraVolumes, so both pods must mount it."""
    values = {
        "redis": {"url": "rediss://:pw@redis.data.svc:6380/0"},
        "env": {"GOVERNOR_REDIS__CA_FILE": "/etc/redis-ca/ca.crt"},
        "extraVolumes": [{"name": "redis-ca", "secret": {"secretName": "redis-ca"}}],
        "extraVolumeMounts": [{"name": "redis-ca", "mountPath": "/etc/redis-ca", "readOnly": True}],
        "gateway": {"enabled": True, "upstream": "http://vllm:8000"},
    }
    docs = manifests(render(values))
    for part in ("controller", "gateway"):
        pod = one(docs, "Deployment", part)["spec"]["template"]["spec"]
        volumes = {v["name"] for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in container(docs, part)["volumeMounts"]}
        ca_file = env(docs, part)["GOVERNOR_REDIS__CA_FILE"]["value"]
        assert mounts.get(ca_file.rsplit("/", 1)[0]) == "redis-ca", f"{part}: {ca_file} missing"
        assert "redis-ca" in volumes, part
        for kube_version in KUBE_VERSIONS:
            kubernetes_validate.validate(one(docs, "Deployment", part), kube_version, strict=True)


def _egress_ports(docs: tuple[Manifest, ...] | list[Manifest]) -> set[int]:
    policy = one(docs, "NetworkPolicy")["spec"]
    return {p["port"] for rule in policy["egress"] for p in rule["ports"]}


def test_locked_down_egress_reaches_the_servers_the_urls_name() -> None:
    """production-values.yaml: Redis over TLS on 6380 must not be cut off by the egress
    rules (6379 by default); nor Sentinels, nor the Kong Admin API on its own port."""
    production = rendered_scenario("production-values.yaml")[1]
    assert {6380, 9090} <= _egress_ports(production)
    values = {
        "networkPolicy": {"enabled": True, "egress": {"enabled": True}},
        "redis": {"url": "redis+sentinel://:pw@sentinel-0:26380,sentinel-1/mymaster/0"},
        "prometheus": {"url": "https://prometheus.monitoring.svc"},
        "kong": {"enabled": True, "adminUrl": "https://kong-admin.kong.svc:8444"},
    }
    docs = manifests(render(values))
    assert {26380, 26379, 6379, 443, 8444} <= _egress_ports(docs)
    for kube_version in KUBE_VERSIONS:
        kubernetes_validate.validate(one(docs, "NetworkPolicy"), kube_version, strict=True)
