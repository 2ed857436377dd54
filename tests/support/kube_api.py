"""A loopback HTTP server that follows the Kubernetes API, for contract tests where no
kube-apiserver can run: GET (one, list), POST, PUT, PATCH and DELETE under
`/apis/<group>/<version>/namespaces/<ns>/<plural>[/<name>]`, `/api/v1/namespaces/<ns>/...`
(the core group) and `/apis/<group>/<version>/<plural>[/<name>]` (cluster-scoped kinds), with
`resourceVersion` optimistic concurrency (a PUT, or a PATCH whose body names a
`metadata.resourceVersion`, carrying a stale one answers 409), `Status` bodies for errors,
equality `labelSelector`s on lists, and a log of every request with its content type. It
serves coordination.k8s.io/v1 Leases; pass more `Resource`s (KONG_PLUGINS,
KONG_CLUSTER_PLUGINS, CONFIG_MAPS below) to serve those too.

Simplifications, on purpose: no watch, no field selectors, no admission or schema
validation, and a strategic-merge patch is applied as a JSON merge patch (RFC 7386), which
differs only for lists with merge keys.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from tests.support.loopback import Loopback, Served
from tests.support.redis import free_port

JSON_PATCH = "application/json-patch+json"
MERGE_PATCHES = ("application/merge-patch+json", "application/strategic-merge-patch+json")
_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/namespaces/(?P<namespace>[^/]+)"
    r"/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)
_CORE_PATH = re.compile(
    r"^/api/(?P<version>v1)/namespaces/(?P<namespace>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)
_CLUSTER_PATH = re.compile(
    r"^/apis/(?P<group>[^/]+)/(?P<version>[^/]+)/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?$"
)


@dataclass(frozen=True)
class Resource:
    """One served kind: its API group, version, plural (as in URLs) and kind."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
KONG_PLUGINS = Resource("configuration.konghq.com", "v1", "kongplugins", "KongPlugin")
KONG_CLUSTER_PLUGINS = Resource(
    "configuration.konghq.com", "v1", "kongclusterplugins", "KongClusterPlugin", namespaced=False
)
CONFIG_MAPS = Resource("", "v1", "configmaps", "ConfigMap")


class ApiError(Exception):
    """An answer with a Kubernetes `Status` body."""

    def __init__(self, code: int, reason: str, message: str, name: str = "") -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.name = code, reason, message, name

    def status(self, resource: Resource | None) -> dict[str, Any]:
        details: dict[str, Any] = {"name": self.name} if self.name else {}
        if resource is not None:
            details.update(group=resource.group, kind=resource.plural)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": details,
            "code": self.code,
        }


@dataclass
class Request:
    """One request the server answered (for assertions)."""

    method: str
    path: str
    status: int
    content_type: str = ""


@dataclass
class KubeApi(Served):
    """The object store and its HTTP server; `start()`, then point a client at `url`."""

    resources: Iterable[Resource] = (LEASES,)
    port: int = field(default_factory=free_port)
    requests: list[Request] = field(default_factory=list)
    # Called before each request is handled (outside the lock): a test's concurrent writer.
    before: Callable[[str, str], None] | None = None
    _objects: dict[tuple[str, str, str], dict[str, Any]] = field(default_factory=dict)
    _revision: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Loopback | None = None

    def __post_init__(self) -> None:
        self._served = {(r.group, r.version, r.plural): r for r in self.resources}

    def _respond(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes
    ) -> tuple[int, Any]:
        content_type = headers.get("content-type", "").split(";")[0].strip()
        if self.before is not None:
            self.before(method, path)
        try:
            body = json.loads(raw) if raw else None
        except json.JSONDecodeError:
            status, answer = 400, ApiError(400, "BadRequest", "not JSON").status(None)
        else:
            status, answer = self.handle(method, path, body, content_type)
        self.requests.append(Request(method, path, status, content_type))
        return status, answer

    def get(self, resource: Resource, namespace: str, name: str) -> dict[str, Any] | None:
        """A stored object (a copy), for assertions; namespace "" for cluster-scoped kinds."""
        with self._lock:
            found = self._objects.get((resource.plural, namespace, name))
            return copy.deepcopy(found)

    def objects(self, resource: Resource, namespace: str) -> dict[str, dict[str, Any]]:
        """Every stored object of a kind (copies) by name; namespace "" when cluster-scoped."""
        with self._lock:
            return {
                name: copy.deepcopy(obj)
                for (plural, ns, name), obj in sorted(self._objects.items())
                if plural == resource.plural and ns == namespace
            }

    def statuses(self, method: str) -> list[int]:
        return [r.status for r in self.requests if r.method == method]

    def put_object(self, resource: Resource, namespace: str, obj: dict[str, Any]) -> None:
        """Store an object as another client would (a test's hand edit), with a new revision."""
        with self._lock:
            stored = copy.deepcopy(obj)
            stored.update(apiVersion=resource.api_version, kind=resource.kind)
            stored.setdefault("metadata", {}).update(
                namespace=namespace or None, resourceVersion=self._next_revision()
            )
            if not resource.namespaced:
                stored["metadata"].pop("namespace")
            self._objects[(resource.plural, namespace, stored["metadata"]["name"])] = stored

    # --- the API, called by the handler under the lock ----------------------------------------

    def handle(self, method: str, path: str, body: Any, content_type: str) -> tuple[int, Any]:
        route, _, query = path.partition("?")
        resource = None
        try:
            resource, namespace, name = self._resolve(route)
            selector = parse_qs(query).get("labelSelector", [""])[0]
            with self._lock:
                if name is None and method == "GET":
                    return 200, self._list(resource, namespace, selector)
                return self._dispatch(method, resource, namespace, name, body, content_type)
        except ApiError as exc:
            return exc.code, exc.status(resource)

    def _resolve(self, route: str) -> tuple[Resource, str, str | None]:
        """(resource, namespace or "" when cluster-scoped, name) of a request path."""
        for pattern in (_PATH, _CORE_PATH, _CLUSTER_PATH):
            match = pattern.match(route)
            if match is None:
                continue
            found = match.groupdict()
            resource = self._served.get(
                (found.get("group") or "", found["version"], found["plural"])
            )
            if resource is not None and resource.namespaced == ("namespace" in found):
                return resource, found.get("namespace") or "", found["name"]
        raise ApiError(404, "NotFound", f"the server could not find the requested resource {route}")

    def _dispatch(
        self,
        method: str,
        resource: Resource,
        namespace: str,
        name: str | None,
        body: Any,
        content_type: str,
    ) -> tuple[int, Any]:
        if name is None and method == "POST":
            return 201, self._create(resource, namespace, body)
        if name is None:
            raise ApiError(405, "MethodNotAllowed", f"{method} needs an object name")
        key = (resource.plural, namespace, name)
        current = self._objects.get(key)
        if current is None:
            raise ApiError(404, "NotFound", f'{_what(resource)} "{name}" not found', name)
        if method == "GET":
            return 200, copy.deepcopy(current)
        if method == "DELETE":
            del self._objects[key]
            return 200, current
        if method == "PUT":
            return 200, self._replace(resource, key, current, body)
        if method == "PATCH":
            patched = _patch(copy.deepcopy(current), body, content_type)
            # A resourceVersion in a merge patch is a precondition (409 when stale), as in
            # the real API server; without one the patch applies to whatever is current.
            wanted = _patched_revision(body, content_type)
            patched["metadata"]["resourceVersion"] = (
                wanted or current["metadata"]["resourceVersion"]
            )
            return 200, self._replace(resource, key, current, patched)
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported")

    def _list(self, resource: Resource, namespace: str, selector: str = "") -> dict[str, Any]:
        wanted = _selector(selector)
        items = [
            copy.deepcopy(obj)
            for (plural, ns, _), obj in sorted(self._objects.items())
            if plural == resource.plural and ns == namespace and _selected(obj, wanted)
        ]
        return {
            "apiVersion": resource.api_version,
            "kind": f"{resource.kind}List",
            "metadata": {"resourceVersion": str(self._revision)},
            "items": items,
        }

    def _create(self, resource: Resource, namespace: str, body: Any) -> dict[str, Any]:
        obj = _object(body)
        name = obj["metadata"].get("name")
        if not name:
            raise ApiError(422, "Invalid", f"{resource.kind} is invalid: metadata.name: Required")
        if (resource.plural, namespace, name) in self._objects:
            raise ApiError(409, "AlreadyExists", f'{_what(resource)} "{name}" already exists', name)
        obj.update(apiVersion=resource.api_version, kind=resource.kind)
        obj["metadata"].update(
            namespace=namespace,
            uid=str(uuid.uuid4()),
            creationTimestamp=dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            resourceVersion=self._next_revision(),
        )
        if not resource.namespaced:
            obj["metadata"].pop("namespace")
        self._objects[(resource.plural, namespace, name)] = obj
        return copy.deepcopy(obj)

    def _replace(
        self,
        resource: Resource,
        key: tuple[str, str, str],
        current: dict[str, Any],
        body: Any,
    ) -> dict[str, Any]:
        obj = _object(body)
        name = key[2]
        if obj["metadata"].get("name", name) != name:
            raise ApiError(400, "BadRequest", "the name of the object does not match the URL")
        wanted = obj["metadata"].get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on {_what(resource)} "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                name,
            )
        obj.update(apiVersion=resource.api_version, kind=resource.kind)
        kept = {
            k: current["metadata"][k]
            for k in ("namespace", "uid", "creationTimestamp")
            if k in current["metadata"]
        }
        obj["metadata"].update(kept, name=name, resourceVersion=self._next_revision())
        self._objects[key] = obj
        return copy.deepcopy(obj)

    def _next_revision(self) -> str:
        self._revision += 1
        return str(self._revision)


def _what(resource: Resource) -> str:
    return f"{resource.plural}.{resource.group}" if resource.group else resource.plural


def _patched_revision(body: Any, content_type: str) -> str | None:
    if content_type not in MERGE_PATCHES or not isinstance(body, dict):
        return None
    metadata = body.get("metadata")
    revision = metadata.get("resourceVersion") if isinstance(metadata, dict) else None
    return str(revision) if revision else None


def _selector(text: str) -> list[tuple[str, str | None]]:
    """Equality-based label selector terms: `k=v`, `k==v` and `k` (exists)."""
    terms: list[tuple[str, str | None]] = []
    for term in filter(None, (t.strip() for t in text.split(","))):
        key, eq, value = term.partition("=")
        if "!" in key:
            raise ApiError(400, "BadRequest", f"unsupported label selector term {term!r}")
        terms.append((key, value.lstrip("=") if eq else None))
    return terms


def _selected(obj: dict[str, Any], terms: list[tuple[str, str | None]]) -> bool:
    labels = obj.get("metadata", {}).get("labels") or {}
    return all(k in labels and (v is None or labels[k] == v) for k, v in terms)


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "BadRequest", "the body must be a JSON object")
    obj = copy.deepcopy(body)
    if not isinstance(obj.setdefault("metadata", {}), dict):
        raise ApiError(400, "BadRequest", "metadata must be an object")
    return obj


def _patch(target: dict[str, Any], patch: Any, content_type: str) -> dict[str, Any]:
    if content_type == JSON_PATCH:
        return _json_patch(target, patch)
    if content_type in MERGE_PATCHES:
        merged = _merge(target, patch)
        if not isinstance(merged, dict):
            raise ApiError(422, "Invalid", "a merge patch must keep the object an object")
        return merged
    raise ApiError(415, "UnsupportedMediaType", f"unsupported patch type {content_type!r}")


def _merge(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge key by key, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(out.get(key), value)
    return out


def _json_patch(target: dict[str, Any], operations: Any) -> dict[str, Any]:
    """RFC 6902 `add`, `replace`, `remove` and `test` on object members and list items."""
    if not isinstance(operations, list):
        raise ApiError(400, "BadRequest", "a JSON patch is a list of operations")
    for operation in operations:
        path = str(operation.get("path", ""))
        parts = [p.replace("~1", "/").replace("~0", "~") for p in path.split("/")[1:]]
        try:
            node: Any = target
            for part in parts[:-1]:
                node = node[int(part)] if isinstance(node, list) else node[part]
            _apply(node, operation.get("op"), parts[-1], operation.get("value"), path)
        except (KeyError, IndexError, ValueError, TypeError):
            raise ApiError(422, "Invalid", f"JSON patch path {path!r} does not exist") from None
    return target


def _apply(node: Any, op: object, last: str, value: Any, path: str) -> None:
    """One JSON patch operation on the member `last` of `node` (an object or a list)."""
    index: Any = last
    if isinstance(node, list):
        index = len(node) if last == "-" else int(last)
        if op == "add":
            node.insert(index, value)
            return
    current = None if op == "add" else node[index]  # KeyError/IndexError: no such path
    if op == "test" and current != value:
        raise ApiError(422, "Invalid", f"test of {path} failed")
    if op == "remove":
        del node[index]
    elif op in ("add", "replace"):
        node[index] = value
    elif op != "test":
        raise ApiError(422, "Invalid", f"unsupported JSON patch operation {op!r}")
