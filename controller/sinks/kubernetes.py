"""The Kubernetes sink: Governor's limits as KongPlugin (or KongClusterPlugin) objects,
configuration.konghq.com/v1 `plugin: rate-limiting`, which the Kong Ingress Controller turns
into Kong plugins. The operator attaches them by name (annotation `konghq.com/plugins` on a
KongConsumer, KongConsumerGroup, Service or Ingress; see `object_name` and docs/sinks.md).

Governor lists, changes and deletes only objects labelled `app.kubernetes.io/managed-by:
governor` and `governor.io/owner: <owner>` whose name matches their `governor.io/scope`
annotation; the ledger is the `governor.io/written` annotation. Writes are JSON merge patches
carrying the object's resourceVersion: a 409 (someone wrote in between) re-reads and retries,
a bounded number of times.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import redis
import urllib3
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from controller.clients.kubernetes import api_client as kube_client
from controller.clients.kubernetes import pod_namespace
from controller.contract.keys import parse_value
from controller.errors import ConfigurationError, SinkError
from controller.model import Address, AddressError
from controller.settings import KongSettings, KubernetesSinkSettings
from controller.sinks.kong_layout import (
    GLOBAL,
    PLUGIN,
    Owner,
    OwnerKind,
    number,
    restored_protocols,
)
from controller.sinks.kong_plugins import (
    Body,
    Instance,
    Listing,
    PluginSink,
    WriteRejectedError,
)

GROUP = "configuration.konghq.com"
VERSION = "v1"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "governor"
OWNER_LABEL = "governor.io/owner"
SCOPE_ANNOTATION = "governor.io/scope"
WRITTEN_ANNOTATION = "governor.io/written"
VERSION_ANNOTATION = "governor.io/version"
MERGE_PATCH = "application/merge-patch+json"
# The verbs each sink uses, per resource (docs/sinks.md#rbac; tests hold the chart to it).
RBAC_VERBS: Mapping[str, tuple[str, ...]] = {
    "kongplugins": ("list", "get", "create", "patch", "delete"),
    "kongclusterplugins": ("list", "get", "create", "patch", "delete"),  # a ClusterRole
    "configmaps": ("get", "create", "patch"),
}
_CLEAN_ID = re.compile(r"[a-z0-9]([-a-z0-9]{0,50}[a-z0-9])?")


class KubeApiError(SinkError):
    """A Kubernetes API call failed; `status` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None) -> None:
        super().__init__(message)
        self.status = status


@contextmanager
def kube_errors(action: str, where: str) -> Iterator[None]:
    """Turn client errors into KubeApiError naming the action, the API and the fix."""
    try:
        yield
    except ApiException as exc:
        status = int(exc.status or 0)
        hint = ""
        if status in (401, 403):
            hint = (
                " (grant the ServiceAccount the verbs in docs/sinks.md#rbac: the chart's "
                "rbac.kongPlugins / rbac.configMaps)"
            )
        elif status == 404 and action.startswith("list"):
            hint = " (are the Kong Ingress Controller's CRDs installed?)"
        raise KubeApiError(
            f"Kubernetes API at {where}: {action} failed ({status}): {_status_message(exc)}{hint}",
            status,
        ) from exc
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        raise KubeApiError(f"Kubernetes API at {where}: {action} failed: {exc}", None) from exc


def _status_message(exc: ApiException) -> str:
    try:
        body = json.loads(str(exc.body))
    except (TypeError, ValueError):
        return str(exc.reason)
    return str(body.get("message") or exc.reason) if isinstance(body, dict) else str(exc.reason)


def api_client(settings: KubernetesSinkSettings) -> Any:
    """A kubernetes ApiClient for the sinks (controller.clients.kubernetes' one rule)."""
    return kube_client(settings.kubeconfig, settings.context, "the Kubernetes sinks")


def sink_namespace(settings: KubernetesSinkSettings) -> str:
    """The configured namespace, else the pod's own, else ConfigurationError."""
    namespace = settings.namespace or pod_namespace()
    if namespace:
        return namespace
    raise ConfigurationError(
        "no namespace for the Kubernetes sinks: set GOVERNOR_KUBERNETES_SINK__NAMESPACE"
    )


def object_name(prefix: str, owner: Owner) -> str:
    """The object's name: `<prefix>-global`, `<prefix>-plan-<id>`, `<prefix>-tenant-<id>`.

    An id that is not already a lowercase DNS label becomes `x.<slug>.<sha256 prefix>`: it
    holds dots, which a clean id never does, so no id can take another's name.
    """
    if owner.kind is OwnerKind.GLOBAL or owner.id is None:
        return f"{prefix}-global"
    ident = owner.id
    if not _CLEAN_ID.fullmatch(ident):
        slug = re.sub(r"[^a-z0-9]+", "-", ident.lower()).strip("-")[:40].strip("-") or "id"
        ident = f"x.{slug}.{hashlib.sha256(owner.id.encode()).hexdigest()[:16]}"
    return f"{prefix}-{owner.kind.value}-{ident}"


class KubernetesStore:
    """KongPlugin or KongClusterPlugin objects through the Kubernetes API."""

    name = "kubernetes"
    writes_password = False  # a password would sit in the object: configPatches instead

    def __init__(
        self, settings: KubernetesSinkSettings, kong: KongSettings, api: Any, namespace: str
    ) -> None:
        self.settings = settings
        self.kong = kong
        self.custom = k8s.CustomObjectsApi(api)
        self.namespace = namespace
        self.cluster = settings.cluster_scoped
        self.kind = "KongClusterPlugin" if self.cluster else "KongPlugin"
        self.plural = "kongclusterplugins" if self.cluster else "kongplugins"
        where = "" if self.cluster else f" in namespace {namespace}"
        self.location = f"{api.configuration.host} ({self.plural}{where})"
        self.selector = f"{MANAGED_BY_LABEL}={MANAGED_BY},{OWNER_LABEL}={settings.owner}"
        self._timeout = settings.timeout_seconds

    @property
    def groups(self) -> bool:
        return self.settings.consumer_groups

    def check(self) -> None:
        self._list()

    def close(self) -> None:
        self.custom.api_client.close()

    # --- the API, namespaced or cluster-scoped ------------------------------------------------

    def _call(self, verb: str, *args: Any, **kwargs: Any) -> Any:
        scope = "cluster" if self.cluster else "namespaced"
        where = () if self.cluster else (self.namespace,)
        method = getattr(self.custom, f"{verb}_{scope}_custom_object")
        target = f" {args[0]}" if args else ""
        with kube_errors(f"{verb} {self.plural}{target}", self.location):
            return method(
                GROUP, VERSION, *where, self.plural, *args, _request_timeout=self._timeout, **kwargs
            )

    def _list(self) -> list[dict[str, Any]]:
        answer = self._call("list", label_selector=self.selector)
        return list(answer.get("items") or [])

    def _get(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self._call("get", name)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise
        return found

    def _ours(self, obj: Mapping[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return bool(
            labels.get(MANAGED_BY_LABEL) == MANAGED_BY
            and labels.get(OWNER_LABEL) == self.settings.owner
        )

    # --- reading ------------------------------------------------------------------------------

    def listing(self) -> Listing:
        instances: dict[Owner, Instance] = {}
        foreign: list[str] = []
        for obj in self._list():
            name = obj["metadata"]["name"]
            try:
                instance = self._parse(obj)
            except (KeyError, TypeError, ValueError, AddressError) as exc:
                foreign.append(f"{self.kind} {name}: labelled Governor's but unreadable ({exc})")
                continue
            if instance.owner in instances:
                foreign.append(f"{self.kind} {name}: a second object for {instance.owner}")
            else:
                instances[instance.owner] = instance
        return Listing(instances, tuple(foreign))

    def _parse(self, obj: Mapping[str, Any]) -> Instance:
        metadata = obj["metadata"]
        annotations = metadata.get("annotations") or {}
        owner = Owner.parse(annotations[SCOPE_ANNOTATION])
        expected = object_name(self.settings.name_prefix, owner)
        if metadata["name"] != expected:
            raise ValueError(f"its scope {owner} belongs to {expected}")
        if obj.get("plugin") != PLUGIN:
            raise ValueError(f"plugin {obj.get('plugin')!r} is not {PLUGIN}")
        ledger = json.loads(annotations.get(WRITTEN_ANNOTATION) or "{}")
        written = {Address.parse(k): parse_value(str(v)) for k, v in ledger.items()}
        return Instance(
            owner,
            metadata["name"],
            obj.get("config") or {},
            written,
            enabled=not obj.get("disabled", False),
            version=int(annotations.get(VERSION_ANNOTATION) or 0),
            handle=obj,
        )

    # --- writing ------------------------------------------------------------------------------

    def resolve(self, owners: Sequence[Owner]) -> dict[Owner, str]:
        return {}  # objects need no Kong entity to exist; the operator attaches them

    def create(self, body: Body) -> None:
        obj = self._object(body)
        try:
            self._call("create", body=obj)
        except KubeApiError as exc:
            if exc.status != 409:
                raise _rejected(exc) from exc
            name = obj["metadata"]["name"]
            existing = self._get(name)
            if existing is None or not self._ours(existing):
                raise WriteRejectedError(
                    f"{self.kind} {name} exists and is not Governor's (no label "
                    f"{OWNER_LABEL}={self.settings.owner}): rename or delete it"
                ) from exc
            try:
                instance = self._parse(existing)
            except (KeyError, TypeError, ValueError, AddressError):
                # Governor's labels and the name only this owner's object has (object_name
                # is injective): Governor's own object with its annotations (or `plugin`)
                # edited by hand. Refusing left the limit unrepaired on every tick; the
                # update writes them back.
                config = existing.get("config") or {}
                instance = Instance(body.owner, name, config, {}, handle=existing)
            self.update(instance, body)

    def update(self, instance: Instance, body: Body) -> None:
        current: Mapping[str, Any] | None = instance.handle
        for attempt in range(self.settings.conflict_retries + 1):
            if current is None:  # deleted meanwhile
                self.create(body)
                return
            if not self._ours(current):
                raise WriteRejectedError(f"{self.kind} {instance.ref} is no longer Governor's")
            try:
                self._call("patch", instance.ref, body=self._patch(current, body))
                return
            except KubeApiError as exc:
                if exc.status != 409:
                    raise _rejected(exc) from exc
                if attempt == self.settings.conflict_retries:
                    raise WriteRejectedError(
                        f"{self.kind} {instance.ref} kept changing: still a conflict after "
                        f"{attempt} re-reads; the next tick tries again"
                    ) from exc
            current = self._get(instance.ref)
            _refuse_another_writers(instance, current)

    def delete(self, instance: Instance) -> None:
        try:
            self._call("delete", instance.ref)
        except KubeApiError as exc:
            if exc.status != 404:
                raise _rejected(exc) from exc

    def differences(self, instance: Instance, body: Body) -> list[str]:
        obj: Mapping[str, Any] = instance.handle
        labels = obj["metadata"].get("labels") or {}
        why = []
        if labels.get("global") != self._labels(body.owner).get("global"):
            why.append("label global")
        if (obj.get("configPatches") or None) != (self._config_patches() or None):
            why.append("configPatches")
        if restored_protocols(obj.get("protocols")) is not None:
            why.append("protocols")
        return why

    def _labels(self, owner: Owner) -> dict[str, str]:
        labels = {MANAGED_BY_LABEL: MANAGED_BY, OWNER_LABEL: self.settings.owner}
        if self.cluster and owner == GLOBAL:
            labels["global"] = "true"  # KIC applies a KongClusterPlugin so labelled globally
        return labels

    def _config_patches(self) -> list[dict[str, Any]]:
        secret = self.settings.redis_password_secret
        if secret is None or self.kong.policy != "redis":
            return []
        ref = {"name": secret, "key": self.settings.redis_password_secret_key}
        if self.cluster:
            ref["namespace"] = self.namespace
        return [{"path": "/redis/password", "valueFrom": {"secretKeyRef": ref}}]

    def _object(self, body: Body) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "name": object_name(self.settings.name_prefix, body.owner),
            "labels": self._labels(body.owner),
            "annotations": {
                SCOPE_ANNOTATION: str(body.owner),
                WRITTEN_ANNOTATION: json.dumps(
                    {str(a): number(v) for a, v in sorted(body.written.items())}
                ),
                VERSION_ANNOTATION: str(body.version),
            },
        }
        if not self.cluster:
            metadata["namespace"] = self.namespace
        obj: dict[str, Any] = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": self.kind,
            "metadata": metadata,
            "plugin": PLUGIN,
            "config": _pruned(body.config),
        }
        patches = self._config_patches()
        if patches:
            obj["configPatches"] = patches
        return obj

    def _patch(self, current: Mapping[str, Any], body: Body) -> dict[str, Any]:
        """A JSON merge patch from `current` to the desired object, with its resourceVersion
        as precondition; labels and annotations of others are kept."""
        wanted = self._object(body)
        labels: dict[str, Any] = dict(wanted["metadata"]["labels"])
        if "global" not in labels and "global" in (current["metadata"].get("labels") or {}):
            labels["global"] = None
        patch: dict[str, Any] = {
            "metadata": {
                "resourceVersion": current["metadata"]["resourceVersion"],
                "labels": labels,
                "annotations": wanted["metadata"]["annotations"],
            },
            "plugin": PLUGIN,
            "config": _merge_patch(current.get("config") or {}, wanted["config"]),
            "configPatches": wanted.get("configPatches"),
            "disabled": None,
        }
        protocols = restored_protocols(current.get("protocols"))
        if protocols is not None:  # a hand edit left some traffic unlimited
            patch["protocols"] = protocols
        return patch


def _refuse_another_writers(instance: Instance, current: Mapping[str, Any] | None) -> None:
    """After a 409: a hand edit keeps Governor's version annotation and is merged into; a
    new version means another Governor replica (a new leader) decided since this tick read,
    and writing this tick's body over it would put a deposed leader's limits back."""
    if current is None:
        return
    listed = (instance.handle["metadata"].get("annotations") or {}).get(VERSION_ANNOTATION)
    found = (current["metadata"].get("annotations") or {}).get(VERSION_ANNOTATION)
    if found != listed:
        raise WriteRejectedError(
            f"{instance.ref}: another Governor wrote it (version {found}, this tick read "
            f"{listed}) since this tick read it; not overwritten, the next tick re-reads"
        )


def _pruned(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config without nulls (an unset field is simply absent from the object)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out[key] = _pruned(value)
        elif value is not None:
            out[key] = value
    return out


def _merge_patch(current: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 patch turning `current` into `wanted`: removed keys become null."""
    patch: dict[str, Any] = {key: None for key in current if key not in wanted}
    for key, value in wanted.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            patch[key] = _merge_patch(old, value)
        else:
            patch[key] = value
    return patch


def _rejected(exc: KubeApiError) -> SinkError:
    """A refusal about this one object (invalid, conflict) or a failure of the API itself."""
    if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (401, 403):
        return WriteRejectedError(str(exc))
    return exc


class KubernetesSink(PluginSink):
    """Limits as KongPlugin / KongClusterPlugin objects (docs/sinks.md)."""

    @classmethod
    def from_settings(
        cls,
        settings: KubernetesSinkSettings,
        kong: KongSettings,
        api: Any,
        *,
        namespace: str,
        registry: Callable[[], Mapping[str, str]] | None = None,
        fence_client: redis.Redis[str] | None = None,
    ) -> KubernetesSink:
        store = KubernetesStore(settings, kong, api, namespace)
        return cls(store, kong, registry=registry, fence_client=fence_client)
