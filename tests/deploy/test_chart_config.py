"""What the chart hands the controller is what the controller reads: the policy ConfigMap is a
valid policy set at the mounted path, and every GOVERNOR_* variable names a real setting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from controller.cli import app
from controller.policy.loader import check_directory
from controller.settings import Settings
from tests.deploy.chart import (
    Manifest,
    container,
    env,
    manifests,
    one,
    render,
    rendered_scenario,
    scenario_values,
    setting_of,
)

# Settings of sinks that land later (issue 7): the chart passes them when kong.enabled, and they
# must name real settings as soon as Settings has the group.
PENDING_GROUPS: set[str] = set()


def _policy_files(docs: tuple[Manifest, ...], directory: Path) -> Path:
    config_map = next(
        doc
        for doc in docs
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-policies")
    )
    for name, text in config_map["data"].items():
        (directory / name).write_text(text)
    return directory


def test_the_policy_configmap_is_mounted_where_the_controller_reads(
    docs: tuple[Manifest, ...], scenario: str
) -> None:
    mounts = {m["name"]: m["mountPath"] for m in container(docs)["volumeMounts"]}
    policy_dir = env(docs)["GOVERNOR_CONTROLLER__POLICY_DIR"]["value"]
    assert mounts["policies"] == policy_dir
    volume = next(
        v
        for v in one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "policies"
    )
    # A whole-directory mount (no subPath) is what the kubelet updates in place: hot reload.
    assert all("subPath" not in m for m in container(docs)["volumeMounts"])
    expected = scenario_values(scenario).get("policies", {}).get("existingConfigMap")
    assert volume["configMap"]["name"] == (expected or "governor-policies")


def test_the_bundled_policies_load_and_pass_their_tests(tmp_path: Path) -> None:
    docs = rendered_scenario("default")[1]
    directory = _policy_files(docs, tmp_path)
    repo_policies = Path(__file__).resolve().parents[2] / "policies"
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        p.name for p in repo_policies.glob("*.yaml")
    )
    policies, errors = check_directory(directory)
    assert errors == []
    assert policies is not None
    result = CliRunner().invoke(app, ["policy", "test", str(directory)])
    assert result.exit_code == 0, result.output


def test_inline_policies_replace_the_bundled_ones(tmp_path: Path) -> None:
    docs = rendered_scenario("inline-policies-values.yaml")[1]
    directory = _policy_files(docs, tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["limits.yaml", "plans.yaml"]
    policies, errors = check_directory(directory)
    assert errors == []
    assert policies is not None
    assert policies.limits.spec.floors


# What `--set-file` hands the chart as it was written: an indented first line (a comment
# block, a file cut out of a larger YAML), a tab, no document at all, leading blank lines.
INLINE_TEXTS = [
    "  # plans for the EU fleet\napiVersion: governor/v1\nkind: Plan\nmetadata: {name: eu}\n"
    "spec: {limits: {requests_per_minute: 5}}\n",
    "\n\n    indented: after blank lines\n",
    "\tkey: tab first\n",
    "",
]


@pytest.mark.parametrize("text", INLINE_TEXTS)
def test_an_inline_policy_file_reaches_the_configmap_byte_for_byte(text: str) -> None:
    # A block scalar guesses its indentation from its first line: a file whose first line is
    # indented rendered a ConfigMap that is no YAML (helm install failed on the chart's own
    # output), or one holding other bytes than the file.
    docs = manifests(render({"policies": {"files": {"eu.yaml": text}}}))
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    assert config_map["data"]["eu.yaml"] == text


def test_every_variable_names_a_setting_and_parses(
    docs: tuple[Manifest, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = [name for name in env(docs) if name.startswith("GOVERNOR_KONG__")]
    known_groups = set(Settings.model_fields)
    for name, item in env(docs).items():
        if not name.startswith("GOVERNOR_"):
            continue
        group = name.removeprefix("GOVERNOR_").split("__")[0].lower()
        if group in PENDING_GROUPS and group not in known_groups:
            continue
        assert setting_of(name) is not None, f"{name} sets no field of controller.settings"
        # Secret references stand for a value the kubelet fills in: use a valid stand-in.
        value = item.get("value")
        if value is None and "secretKeyRef" in item.get("valueFrom", {}):
            value = "redis://redis:6379/0" if name == "GOVERNOR_REDIS__URL" else "s3cret"
        elif value is None:  # fieldRef: the pod's name or namespace
            value = "governor-0"
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.controller.policy_dir == Path(
        env(docs)["GOVERNOR_CONTROLLER__POLICY_DIR"]["value"]
    )
    assert settings.telemetry.port == int(env(docs)["GOVERNOR_TELEMETRY__PORT"]["value"])
    assert settings.leader.mode == env(docs)["GOVERNOR_LEADER__MODE"]["value"]
    assert settings.redis.url is not None
    if pending:  # only the scenarios that enable Kong pass its settings
        assert env(docs)["GOVERNOR_KONG__ADMIN_URL"]["value"].startswith("http")


def test_a_pending_setting_group_is_reported_once_it_exists() -> None:
    """When Settings gains a pending group, the chart's names are checked (see above)."""
    docs = rendered_scenario("existing-secret-values.yaml")[1]
    names = [n for n in env(docs) if n.startswith("GOVERNOR_KONG__")]
    assert names == ["GOVERNOR_KONG__ADMIN_URL", "GOVERNOR_KONG__ADMIN_TOKEN"]
    for group in PENDING_GROUPS & set(Settings.model_fields):
        for name in names:
            assert setting_of(name) is not None, f"{name}: rename it to the real {group} setting"


def test_the_sinks_follow_the_kong_and_rbac_switches() -> None:
    from tests.deploy.chart import env, manifests, render

    def sinks(values: dict[str, Any]) -> str:
        value = env(manifests(render(values)))["GOVERNOR_CONTROLLER__SINKS"]["value"]
        assert isinstance(value, str)
        return value

    assert sinks({}) == "redis"
    both = {
        "kong": {"enabled": True, "adminUrl": "http://kong:8001"},
        "rbac": {"kongPlugins": True},
    }
    assert sinks(both) == "redis,kong,kubernetes"


def test_kong_cluster_plugins_get_a_cluster_role_bound_to_the_service_account() -> None:
    from tests.deploy.chart import env, manifests, of_kind, one, render

    docs = manifests(render({"rbac": {"kongClusterPlugins": True}}))

    variables = env(docs)
    assert variables["GOVERNOR_CONTROLLER__SINKS"]["value"] == "redis,kubernetes"
    assert variables["GOVERNOR_KUBERNETES_SINK__CLUSTER_SCOPED"]["value"] == "true"
    role = one(docs, "ClusterRole")
    assert [r["resources"] for r in role["rules"]] == [["kongclusterplugins"]]
    assert {"create", "patch", "delete"} <= set(role["rules"][0]["verbs"])
    binding = one(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    account = one(docs, "ServiceAccount")["metadata"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["name"], "namespace": account["namespace"]}
    ]
    # The namespaced Role keeps only what else is on (the Lease), nothing of Kong's.
    groups = {g for role in of_kind(docs, "Role") for r in role["rules"] for g in r["apiGroups"]}
    assert "configuration.konghq.com" not in groups
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["automountServiceAccountToken"]


def test_kong_plugins_and_kong_cluster_plugins_cannot_both_be_on() -> None:
    from helm_python.errors import HelmRenderError

    from tests.deploy.chart import render

    with pytest.raises(HelmRenderError, match="exclusive"):
        render({"rbac": {"kongPlugins": True, "kongClusterPlugins": True}})
