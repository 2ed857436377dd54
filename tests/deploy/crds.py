"""Minimal JSON schemas of the Prometheus Operator objects the chart renders, which
kubernetes-validate does not ship: the fields the chart may set (a subset of the CRDs'
OpenAPI schemas), with `additionalProperties: false` so that a misspelt field fails."""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

DURATION: Schema = {"type": "string", "pattern": "^([0-9]+(ms|s|m|h|d|w|y))+$"}
LABELS: Schema = {"type": "object", "additionalProperties": {"type": "string"}}
STRINGS: Schema = {"type": "array", "items": {"type": "string"}}


def _closed(properties: Schema, required: tuple[str, ...] = ()) -> Schema:
    """An object schema that allows only `properties`."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(required),
        "properties": properties,
    }


def _items(item: Schema) -> Schema:
    return {"type": "array", "minItems": 1, "items": item}


def _object(kind: str, spec: Schema) -> Schema:
    """A namespaced monitoring.coreos.com/v1 object of `kind` with the given spec schema."""
    metadata = {
        "type": "object",
        "required": ["name", "namespace"],
        "properties": {
            "name": {"type": "string"},
            "namespace": {"type": "string"},
            "labels": LABELS,
        },
    }
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"},
            "kind": {"const": kind},
            "metadata": metadata,
            "spec": spec,
        },
    }


ENDPOINT = _closed(
    {
        "port": {"type": "string"},
        "path": {"type": "string"},
        "interval": DURATION,
        "scrapeTimeout": DURATION,
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array"},
        "metricRelabelings": {"type": "array"},
        # SafeAuthorization: the scrape's Authorization header from a Secret's key.
        "authorization": _closed(
            {
                "type": {"type": "string"},
                "credentials": _closed(
                    {
                        "name": {"type": "string"},
                        "key": {"type": "string"},
                        "optional": {"type": "boolean"},
                    },
                    required=("key",),
                ),
            }
        ),
    },
    required=("port",),
)
SERVICE_MONITOR = _object(
    "ServiceMonitor",
    _closed(
        {
            "jobLabel": {"type": "string"},
            "namespaceSelector": _closed({"any": {"type": "boolean"}, "matchNames": STRINGS}),
            "selector": _closed({"matchLabels": LABELS}),
            "endpoints": _items(ENDPOINT),
        },
        required=("selector", "endpoints"),
    ),
)
RULE = _closed(
    {
        "alert": {"type": "string", "pattern": "^Governor[A-Za-z]+$"},
        "expr": {"type": "string", "minLength": 1},
        "for": DURATION,
        "labels": {
            "type": "object",
            "required": ["severity"],
            "properties": {"severity": {"enum": ["info", "warning", "critical"]}},
            "additionalProperties": {"type": "string"},
        },
        "annotations": {
            "type": "object",
            "required": ["summary", "description", "runbook_url"],
            "additionalProperties": {"type": "string"},
        },
    },
    required=("alert", "expr", "labels", "annotations"),
)
PROMETHEUS_RULE = _object(
    "PrometheusRule",
    _closed(
        {
            "groups": _items(
                _closed({"name": {"type": "string"}, "rules": _items(RULE)}, ("name", "rules"))
            )
        },
        required=("groups",),
    ),
)
CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}
