"""The ConfigMap sink: the whole limit document in one ConfigMap, for gateways other than Kong.

Key `limits.json` holds `{"version": N, "limits": {address: value}}`, the shape of
`governor limits get --json`; every limit kind is kept (nothing here is Kong-specific). Key
`governor-ledger.json` is Governor's own: what it last wrote, for drift. Writes are JSON
merge patches carrying the ConfigMap's resourceVersion; a 409 re-reads and retries.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from controller.changes import Change
from controller.contract.fence import Fence
from controller.errors import SinkError
from controller.model import Address, AddressError
from controller.settings import KubernetesSinkSettings
from controller.sinks import ApplyResult, SinkState
from controller.sinks.fencing import check_fence
from controller.sinks.kong_layout import number
from controller.sinks.kong_plugins import holds
from controller.sinks.kubernetes import (
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MERGE_PATCH,
    OWNER_LABEL,
    KubeApiError,
    kube_errors,
)

LIMITS_KEY = "limits.json"
LEDGER_KEY = "governor-ledger.json"
MAX_BYTES = 1_000_000  # a ConfigMap holds at most 1 MiB


class ConfigMapSink:
    """One ConfigMap owned by Governor. One instance per process; not thread-safe."""

    name = "configmap"

    def __init__(
        self,
        settings: KubernetesSinkSettings,
        api: Any,
        *,
        namespace: str,
        fence_client: redis.Redis[str] | None = None,
    ) -> None:
        from kubernetes import client as k8s

        self.settings = settings
        self.core = k8s.CoreV1Api(api)
        self.namespace = namespace
        self.configmap = settings.configmap_name
        self.location = f"{api.configuration.host} (configmap {namespace}/{self.configmap})"
        self.fence: Callable[[], Fence | None] | None = None
        self.fence_client = fence_client
        self._version = 0

    def check(self) -> None:
        self._get()

    def close(self) -> None:
        self.core.api_client.close()

    def read(self) -> SinkState:
        """The document's limits, the ledger and the version (all empty before the first
        apply)."""
        obj = self._get()
        if obj is None:
            return SinkState({}, {}, self._version)
        data = obj.get("data") or {}
        document = _document(data.get(LIMITS_KEY))
        actual, foreign = _limits(document.get("limits"))
        written, _ = _limits(_document(data.get(LEDGER_KEY)).get("limits"))
        version = document.get("version")
        self._version = version if isinstance(version, int) else 0
        return SinkState(actual, written, self._version, tuple(foreign))

    def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Rewrite the document with `changes` and version + 1, then read back. No changes:
        nothing is written."""
        if not changes:
            return ApplyResult(version=self._version)
        check_fence(self.fence, self.fence_client, f"{len(changes)} changes to {self.name}")
        version = self._write(changes)
        state = self.read()
        mismatched = tuple(c for c in changes if not holds(state, c))
        return ApplyResult(version=version, applied=tuple(changes), mismatched=mismatched)

    def _write(self, changes: Sequence[Change]) -> int:
        for attempt in range(self.settings.conflict_retries + 1):
            current = self._get()
            data = (current or {}).get("data") or {}
            document = _document(data.get(LIMITS_KEY))
            raw = dict(document.get("limits") or {})
            for change in changes:
                if change.new is None:
                    raw.pop(str(change.address), None)
                else:
                    raw[str(change.address)] = number(change.new)
            version = int(document.get("version") or 0) + 1
            ledger, _ = _limits(raw)
            limits_text = _dump({"version": version, "limits": dict(sorted(raw.items()))})
            ledger_text = _dump({"limits": {str(a): number(v) for a, v in sorted(ledger.items())}})
            if len(limits_text) + len(ledger_text) > MAX_BYTES:
                raise SinkError(
                    f"{len(raw)} limits do not fit in ConfigMap {self.configmap} (1 MiB): "
                    "drop `configmap` from GOVERNOR_CONTROLLER__SINKS and read limits from Redis"
                )
            new_data = {LIMITS_KEY: limits_text, LEDGER_KEY: ledger_text}
            try:
                if current is None:
                    self._create(new_data)
                else:
                    self._patch(current, new_data)
                return version
            except KubeApiError as exc:
                if exc.status not in (404, 409) or attempt == self.settings.conflict_retries:
                    raise
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _metadata(self) -> dict[str, Any]:
        return {
            "name": self.configmap,
            "namespace": self.namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, OWNER_LABEL: self.settings.owner},
        }

    def _get(self) -> dict[str, Any] | None:
        try:
            with kube_errors(f"read configmap {self.configmap}", self.location):
                obj = self.core.read_namespaced_config_map(
                    self.configmap, self.namespace, _request_timeout=self.settings.timeout_seconds
                )
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        found: dict[str, Any] = self.core.api_client.sanitize_for_serialization(obj)
        labels = found.get("metadata", {}).get("labels") or {}
        if labels.get(OWNER_LABEL) != self.settings.owner or (
            labels.get(MANAGED_BY_LABEL) != MANAGED_BY
        ):
            raise SinkError(
                f"ConfigMap {self.namespace}/{self.configmap} exists and is not Governor's (no "
                f"label {OWNER_LABEL}={self.settings.owner}): set another "
                "GOVERNOR_KUBERNETES_SINK__CONFIGMAP_NAME, or label it if it is"
            )
        return found

    def _create(self, data: Mapping[str, str]) -> None:
        body: Any = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": self._metadata()}
        body["data"] = dict(data)
        with kube_errors(f"create configmap {self.configmap}", self.location):
            self.core.create_namespaced_config_map(
                self.namespace, body, _request_timeout=self.settings.timeout_seconds
            )

    def _patch(self, current: Mapping[str, Any], data: Mapping[str, str]) -> None:
        metadata = self._metadata()
        patch = {
            "metadata": {
                "labels": metadata["labels"],
                "resourceVersion": current["metadata"]["resourceVersion"],
            },
            "data": dict(data),
        }
        with kube_errors(f"patch configmap {self.configmap}", self.location):
            self.core.patch_namespaced_config_map(
                self.configmap,
                self.namespace,
                patch,
                _content_type=MERGE_PATCH,
                _request_timeout=self.settings.timeout_seconds,
            )


def _document(text: str | None) -> dict[str, Any]:
    """A JSON document from the ConfigMap; {} when missing or not a JSON object."""
    try:
        document = json.loads(text) if text else {}
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}


def _limits(raw: object) -> tuple[dict[Address, float], list[str]]:
    """Address → value, and the entries that are not a limit Governor understands."""
    limits: dict[Address, float] = {}
    foreign: list[str] = []
    for key, value in (raw if isinstance(raw, dict) else {}).items():
        try:
            address = Address.parse(key)
        except AddressError:
            foreign.append(f"{LIMITS_KEY} {key!r}")
            continue
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        limits[address] = float(value) if ok and math.isfinite(value) else math.nan
    return limits, foreign


def _dump(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=False)
