"""The Helm chart rendered with Helm's own engine (helm-python-sdk), split into manifests."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from helm_python.chart import Chart
from pydantic import BaseModel

from controller.settings import Settings

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "governor"
RELEASE = "governor"
NAMESPACE = "governor"
DEFAULT = "default"
KUBE_VERSIONS = ("1.30.0", "1.33.0")

Manifest = dict[str, Any]


def scenarios() -> list[str]:
    """ "default" (the chart's values.yaml alone) and every ci/*-values.yaml file name."""
    return [DEFAULT, *sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))]


def scenario_values(scenario: str) -> dict[str, Any]:
    """The values a scenario passes on top of values.yaml."""
    if scenario == DEFAULT:
        return {}
    loaded = yaml.safe_load((CHART / "ci" / scenario).read_text())
    assert isinstance(loaded, dict), f"ci/{scenario} must be a mapping"
    return loaded


def render(values: dict[str, Any]) -> dict[str, str]:
    """Template path → rendered text, as `helm install governor -n governor` would render."""
    with Chart.load(CHART) as chart:
        rendered: dict[str, str] = chart.render(
            values, name=RELEASE, namespace=NAMESPACE, is_install=True
        )
    return rendered


def manifests(rendered: dict[str, str]) -> list[Manifest]:
    """Every non-empty YAML document of the rendered templates (NOTES.txt excluded)."""
    out: list[Manifest] = []
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt"):
            continue
        out.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return out


@functools.cache
def rendered_scenario(scenario: str) -> tuple[dict[str, str], tuple[Manifest, ...]]:
    """A scenario's rendered templates and manifests (rendered once per test session)."""
    rendered = render(scenario_values(scenario))
    return rendered, tuple(manifests(rendered))


def component(doc: Manifest) -> str:
    """`controller` or `gateway`: which part of Governor an object belongs to."""
    labels = doc.get("metadata", {}).get("labels") or {}
    return str(labels.get("app.kubernetes.io/component", "controller"))


def of_kind(
    docs: tuple[Manifest, ...] | list[Manifest], kind: str, part: str = "controller"
) -> list[Manifest]:
    """The objects of a kind that belong to `part` (the controller unless asked)."""
    return [doc for doc in docs if doc.get("kind") == kind and component(doc) == part]


def one(
    docs: tuple[Manifest, ...] | list[Manifest], kind: str, part: str = "controller"
) -> Manifest:
    found = of_kind(docs, kind, part)
    assert len(found) == 1, f"expected one {part} {kind}, got {len(found)}"
    return found[0]


def container(
    docs: tuple[Manifest, ...] | list[Manifest], part: str = "controller"
) -> dict[str, Any]:
    """The container of the controller's (or the gateway's) Deployment."""
    spec = one(docs, "Deployment", part)["spec"]["template"]["spec"]
    containers = spec["containers"]
    assert len(containers) == 1
    first: dict[str, Any] = containers[0]
    return first


def env(
    docs: tuple[Manifest, ...] | list[Manifest], part: str = "controller"
) -> dict[str, dict[str, Any]]:
    """The container's environment, name → EnvVar."""
    return {item["name"]: item for item in container(docs, part).get("env", [])}


def alert_rules(docs: tuple[Manifest, ...] | list[Manifest]) -> list[dict[str, Any]]:
    """Every rule of the PrometheusRule."""
    rule = one(docs, "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def pod_environment(
    docs: tuple[Manifest, ...] | list[Manifest],
    pod: str,
    local: Mapping[str, str],
    part: str = "controller",
) -> dict[str, str]:
    """A container's environment as the kubelet would build it for pod `pod`: `local` gives
    the values of Secret references and replaces addresses with local ones."""
    out = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    fields = {"metadata.name": pod, "metadata.namespace": NAMESPACE}
    for item in container(docs, part)["env"]:
        value_from: dict[str, Any] = item.get("valueFrom", {})
        if "fieldRef" in value_from:
            out[item["name"]] = fields[value_from["fieldRef"]["fieldPath"]]
        elif "secretKeyRef" in value_from:
            out[item["name"]] = local[item["name"]]
        else:
            out[item["name"]] = item["value"]
    out.update({k: v for k, v in local.items() if k in out})
    return out


def setting_of(variable: str) -> Any:
    """The pydantic field a GOVERNOR_<GROUP>__<FIELD> variable sets, or None."""
    parts = variable.removeprefix("GOVERNOR_").lower().split("__")
    model: type[BaseModel] = Settings
    field = None
    for part in parts:
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
    return field
