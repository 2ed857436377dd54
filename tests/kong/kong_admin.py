"""A loopback HTTP server that follows Kong's Admin API (3.6+) for the entities the Kong sink
touches, for contract tests where no Kong can run: `GET /`, `/consumers`, `/consumer_groups`
(Enterprise edition only), `/services`, `/plugins` and the nested `/<parent>/<id>/plugins`,
with Kong's pagination (`size` ≤ 1000, opaque `offset`, `next` without the workspace prefix),
tag filtering (`a,b` all of, `a/b` any of), `?custom_id=` on consumers, the workspace path
prefix, the `Kong-Admin-Token` header, and Kong's error bodies (400 schema/foreign-key
violation, 404 `Not found`, 409 unique violation). Deleting a consumer, service or consumer
group deletes the plugins scoped to it (the schema's `on_delete = "cascade"`); PATCH may
change any field, a consumer's `custom_id` or a plugin's `consumer` included.

The `rate-limiting` config is validated like kong/plugins/rate-limiting/schema.lua (periods
> 0 and ordered, `limit_by`, `policy`, `policy: redis` needs `redis.host`, unknown fields
refused) and stored with the schema's defaults, as Kong returns it. PATCH merges records
(a JSON null unsets a field) and replaces `tags`. Not modelled: form-encoded bodies, routes,
plugin ordering, DB-less mode.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from tests.support.loopback import Loopback, Served
from tests.support.redis import free_port
from tests.support.tls import TlsFiles

PERIODS = ("second", "minute", "hour", "day", "month", "year")
_REDIS_DEFAULTS: dict[str, Any] = {
    "host": None,
    "port": 6379,
    "timeout": 2000,
    "username": None,
    "password": None,
    "database": 0,
    "ssl": False,
    "ssl_verify": False,
    "server_name": None,
}
_RATE_LIMITING_DEFAULTS: dict[str, Any] = {
    **dict.fromkeys(PERIODS),
    "limit_by": "consumer",
    "header_name": None,
    "path": None,
    "policy": "local",
    "fault_tolerant": True,
    "redis": _REDIS_DEFAULTS,
    "hide_client_headers": False,
    "error_code": 429,
    "error_message": "API rate limit exceeded",
    "sync_rate": -1,
}
_PLUGIN_UNIQUE = ("name", "route", "service", "consumer", "consumer_group")  # Kong's cache_key
_TAG = re.compile(r"[\x21-\x2b\x2d\x2e\x30-\x7e\x80-\xf4]+")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Collections, their endpoint key (a non-UUID path segment selects by it), and where enabled.
_COLLECTIONS = {
    "consumers": "username",
    "consumer_groups": "name",
    "services": "name",
    "plugins": "instance_name",
}


class KongError(Exception):
    """An answer with one of Kong's error bodies."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(body.get("message"))
        self.status, self.body = status, body


def _schema_violation(fields: dict[str, Any], message: str) -> KongError:
    return KongError(
        400, {"code": 2, "name": "schema violation", "message": message, "fields": fields}
    )


def _not_found() -> KongError:
    return KongError(404, {"message": "Not found"})


@dataclass
class Request:
    """One request the server answered (for assertions)."""

    method: str
    path: str
    status: int


@dataclass
class KongAdmin(Served):
    """The entity store and its HTTP server; `start()`, then point the sink at `url`."""

    edition: str = "community"
    token: str | None = None
    workspaces: tuple[str, ...] = ("default",)
    port: int = field(default_factory=free_port)
    requests: list[Request] = field(default_factory=list)
    # Called before each request is handled (outside the lock): a test's concurrent writer,
    # or an outage (a status returned is the answer, with Kong's 5xx body).
    before: Callable[[str, str], int | None] | None = None
    _store: dict[str, dict[str, dict[str, dict[str, Any]]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: Loopback | None = None
    tls: TlsFiles | None = None

    def __post_init__(self) -> None:
        for workspace in self.workspaces:
            self._store[workspace] = {name: {} for name in _COLLECTIONS}

    def _respond(
        self, method: str, path: str, headers: Mapping[str, str], raw: bytes
    ) -> tuple[int, Any]:
        status, answer = self.handle(method, path, headers, raw)
        self.requests.append(Request(method, path, status))
        return status, answer

    # --- for assertions -------------------------------------------------------------------------

    def entities(self, collection: str, workspace: str = "default") -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(e) for e in self._store[workspace][collection].values()]

    def count(self, *methods: str) -> int:
        return sum(1 for r in self.requests if r.method in methods)

    def writes(self) -> int:
        return self.count("POST", "PUT", "PATCH", "DELETE")

    # --- the API ------------------------------------------------------------------------------

    def handle(
        self, method: str, target: str, headers: Mapping[str, str], raw: bytes
    ) -> tuple[int, Any]:
        failure = self.before(method, target) if self.before is not None else None
        if failure is not None:
            return failure, {"message": "An unexpected error occurred"}
        try:
            if self.token is not None and headers.get("kong-admin-token") != self.token:
                raise KongError(
                    401, {"message": "Invalid credentials. Token or User credentials required"}
                )
            body = json.loads(raw) if raw else {}
            parts = urlsplit(target)
            query = {k: v[0] for k, v in parse_qs(parts.query).items()}
            segments = [unquote(s) for s in parts.path.split("/") if s]
            workspace = "default"
            if segments and segments[0] in self._store and segments[0] not in _COLLECTIONS:
                workspace = segments.pop(0)
            with self._lock:
                return self._route(method, self._store[workspace], segments, query, body)
        except KongError as exc:
            return exc.status, exc.body
        except json.JSONDecodeError:
            return 400, {"message": "Cannot parse JSON body"}

    def _route(
        self,
        method: str,
        store: dict[str, dict[str, dict[str, Any]]],
        segments: list[str],
        query: dict[str, str],
        body: Any,
    ) -> tuple[int, Any]:
        if not segments and method == "GET":
            return 200, self._node(store)
        if not segments or segments[0] not in _COLLECTIONS:
            raise _not_found()
        collection = segments[0]
        if collection == "consumer_groups" and self.edition != "enterprise":
            raise _not_found()
        if len(segments) == 1:
            return self._collection(method, store, collection, query, body, parent=None)
        entity = self._find(store, collection, segments[1])
        if len(segments) == 3 and segments[2] == "plugins" and collection != "plugins":
            if entity is None:
                raise _not_found()
            return self._collection(method, store, "plugins", query, body, (collection, entity))
        if len(segments) != 2:
            raise _not_found()
        return self._entity(method, store, collection, entity, body)

    def _node(self, store: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        names = sorted({p["name"] for p in store["plugins"].values()})
        return {
            "tagline": "Welcome to kong",
            "version": "3.9.0" if self.edition == "community" else "3.9.0.0",
            "edition": self.edition,
            "plugins": {
                "available_on_server": {
                    "rate-limiting": {"version": "3.9.0", "priority": 910},
                    "key-auth": {"version": "3.9.0", "priority": 1250},
                },
                "enabled_in_cluster": names,
            },
        }

    def _collection(
        self,
        method: str,
        store: dict[str, dict[str, dict[str, Any]]],
        collection: str,
        query: dict[str, str],
        body: Any,
        parent: tuple[str, dict[str, Any]] | None,
    ) -> tuple[int, Any]:
        if method == "GET":
            return 200, self._page(store, collection, query, parent)
        if method != "POST":
            raise KongError(405, {"message": "Method not allowed"})
        if not isinstance(body, dict):
            raise _schema_violation({}, "the body must be a JSON object")
        if parent is not None:
            body[{"consumers": "consumer", "consumer_groups": "consumer_group"}.get(
                parent[0], "service"
            )] = {"id": parent[1]["id"]}  # fmt: skip
        entity = self._validate(store, collection, body, current=None)
        store[collection][entity["id"]] = entity
        return 201, copy.deepcopy(entity)

    def _page(
        self,
        store: dict[str, dict[str, dict[str, Any]]],
        collection: str,
        query: dict[str, str],
        parent: tuple[str, dict[str, Any]] | None,
    ) -> dict[str, Any]:
        if collection == "consumers" and "custom_id" in query:
            found = [c for c in store["consumers"].values() if c["custom_id"] == query["custom_id"]]
            return {"data": copy.deepcopy(found[:1]), "next": None}
        size = _size(query.get("size"))
        items = sorted(store[collection].values(), key=lambda e: str(e["id"]))
        if parent is not None:
            key = {"consumers": "consumer", "consumer_groups": "consumer_group"}.get(
                parent[0], "service"
            )
            items = [e for e in items if (e.get(key) or {}).get("id") == parent[1]["id"]]
        if "tags" in query:
            items = [e for e in items if _tags_match(e.get("tags") or [], query["tags"])]
        if "offset" in query:
            after = _decode_offset(query["offset"])
            items = [e for e in items if str(e["id"]) > after]
        page, more = items[:size], len(items) > size
        answer: dict[str, Any] = {"data": copy.deepcopy(page), "next": None}
        if more:
            offset = base64.b64encode(json.dumps([page[-1]["id"]]).encode()).decode()
            extra = f"&tags={quote(query['tags'])}" if "tags" in query else ""
            extra += f"&size={query['size']}" if "size" in query else ""
            # Like Kong: the next path names the collection only, without a workspace prefix.
            answer.update(offset=offset, next=f"/{collection}?offset={quote(offset)}{extra}")
        return answer

    def _entity(
        self,
        method: str,
        store: dict[str, dict[str, dict[str, Any]]],
        collection: str,
        entity: dict[str, Any] | None,
        body: Any,
    ) -> tuple[int, Any]:
        if method == "DELETE":
            if entity is not None:  # Kong answers 204 whether or not it existed
                del store[collection][entity["id"]]
                _cascade(store, collection, entity["id"])
            return 204, None
        if entity is None:
            raise _not_found()
        if method == "GET":
            if collection == "consumer_groups":
                return 200, {"consumer_group": copy.deepcopy(entity), "consumers": []}
            return 200, copy.deepcopy(entity)
        if method == "PATCH":
            if not isinstance(body, dict):
                raise _schema_violation({}, "the body must be a JSON object")
            merged = _merge(copy.deepcopy(entity), body)
            updated = self._validate(store, collection, merged, current=entity)
            store[collection][entity["id"]] = updated
            return 200, copy.deepcopy(updated)
        raise KongError(405, {"message": "Method not allowed"})

    def _find(
        self, store: dict[str, dict[str, dict[str, Any]]], collection: str, key: str
    ) -> dict[str, Any] | None:
        if _UUID.fullmatch(key):  # like Kong: a UUID-shaped segment is the primary key
            return store[collection].get(key)
        by = _COLLECTIONS[collection]
        return next((e for e in store[collection].values() if e.get(by) == key), None)

    # --- validation, as Kong's schemas do it ------------------------------------------------

    def _validate(
        self,
        store: dict[str, dict[str, dict[str, Any]]],
        collection: str,
        body: dict[str, Any],
        current: dict[str, Any] | None,
    ) -> dict[str, Any]:
        now = int(time.time())
        entity: dict[str, Any] = {
            "id": (current or {}).get("id") or str(uuid.uuid4()),
            "created_at": (current or {}).get("created_at") or now,
            "updated_at": now,
            "tags": _checked_tags(body.get("tags")),
        }
        if collection == "consumers":
            entity.update(username=body.get("username"), custom_id=body.get("custom_id"))
            if entity["username"] is None and entity["custom_id"] is None:
                raise _schema_violation(
                    {"@entity": ["at least one of these fields must be non-empty: "
                                 "'custom_id', 'username'"]},
                    "schema violation (at least one of these fields must be non-empty: "
                    "'custom_id', 'username')",
                )  # fmt: skip
            for unique in ("username", "custom_id"):
                self._unique(store, collection, entity, {unique: entity[unique]})
        elif collection in ("consumer_groups", "services"):
            entity["name"] = body.get("name")
            if collection == "services":
                entity.update(host=body.get("host", "example.invalid"), port=body.get("port", 80))
            self._unique(store, collection, entity, {"name": entity["name"]})
        else:
            entity.update(self._plugin(store, body))
            self._unique(
                store,
                "plugins",
                entity,
                {
                    k: entity.get(k)
                    for k in ("name", "route", "service", "consumer", "consumer_group")
                },
            )
        return entity

    def _plugin(
        self, store: dict[str, dict[str, dict[str, Any]]], body: dict[str, Any]
    ) -> dict[str, Any]:
        name = body.get("name")
        if name not in ("rate-limiting", "key-auth"):
            raise _schema_violation(
                {"name": f"plugin '{name}' not enabled; add it to the 'plugins' configuration "
                         "property"},
                f"schema violation (name: plugin '{name}' not enabled)",
            )  # fmt: skip
        plugin: dict[str, Any] = {
            "name": name,
            "instance_name": body.get("instance_name"),
            "enabled": body.get("enabled", True),
            "protocols": body.get("protocols") or ["grpc", "grpcs", "http", "https"],
            "route": None,
        }
        refs = {"consumer": "consumers", "service": "services"}
        if self.edition == "enterprise":
            refs["consumer_group"] = "consumer_groups"
        elif body.get("consumer_group") is not None:
            raise _schema_violation(
                {"consumer_group": "unknown field"}, "schema violation (consumer_group: unknown)"
            )
        for key, collection in refs.items():
            ref = body.get(key)
            plugin[key] = None
            if ref is None:
                continue
            if not isinstance(ref, dict) or ref.get("id") not in store[collection]:
                raise KongError(
                    400,
                    {
                        "code": 3,
                        "name": "foreign key violation",
                        "message": f"the foreign key '{{id=\"{(ref or {}).get('id')}\"}}' "
                        f"does not reference an existing '{collection}' entity.",
                        "fields": {key: f"the foreign key does not reference an existing "
                                        f"'{collection}' entity."},
                    },
                )  # fmt: skip
            plugin[key] = {"id": ref["id"]}
        config = body.get("config") or {}
        plugin["config"] = _rate_limiting(config) if name == "rate-limiting" else config
        return plugin

    def _unique(
        self,
        store: dict[str, dict[str, dict[str, Any]]],
        collection: str,
        entity: dict[str, Any],
        key: dict[str, Any],
    ) -> None:
        if all(v is None for v in key.values()) and collection != "plugins":
            return
        for other in store[collection].values():
            if other["id"] != entity["id"] and all(other.get(k) == v for k, v in key.items()):
                shown = ", ".join(
                    f"{k}=" + (json.dumps(v) if v is not None else "null") for k, v in key.items()
                )
                raise KongError(
                    409,
                    {
                        "code": 5,
                        "name": "unique constraint violation",
                        "message": f"UNIQUE violation detected on '{{{shown}}}'",
                        "fields": key,
                    },
                )


# kong/db/schema/entities/plugins.lua: `consumer`, `service` (and in Kong Enterprise
# `consumer_group`) are foreign keys with `on_delete = "cascade"`: deleting the entity deletes
# the plugins scoped to it.
_CASCADE = {"consumers": "consumer", "services": "service", "consumer_groups": "consumer_group"}


def _cascade(store: dict[str, dict[str, dict[str, Any]]], collection: str, deleted: str) -> None:
    key = _CASCADE.get(collection)
    if key is None:
        return
    for plugin_id, plugin in list(store["plugins"].items()):
        if (plugin.get(key) or {}).get("id") == deleted:
            del store["plugins"][plugin_id]


def _rate_limiting(config: dict[str, Any]) -> dict[str, Any]:
    """kong/plugins/rate-limiting/schema.lua: fields, defaults, entity checks."""
    unknown = set(config) - set(_RATE_LIMITING_DEFAULTS)
    if unknown:
        fields = {"config": dict.fromkeys(sorted(unknown), "unknown field")}
        raise _schema_violation(fields, f"schema violation (config.{sorted(unknown)[0]}: unknown)")
    out: dict[str, Any] = _merge(copy.deepcopy(_RATE_LIMITING_DEFAULTS), config)
    if not isinstance(out["redis"], dict):  # null: back to the record's defaults
        out["redis"] = dict(_REDIS_DEFAULTS)
    if set(out["redis"]) - set(_REDIS_DEFAULTS):
        raise _schema_violation({"config": {"redis": "unknown field"}}, "schema violation")
    problems = _field_problems(out)
    if problems:
        raise _schema_violation({"config": problems}, "schema violation")
    _check_entity(out)
    return out


def _field_problems(out: dict[str, Any]) -> dict[str, str]:
    """Each field's own type and range check, as Kong reports them together."""
    problems: dict[str, str] = {}
    for period in PERIODS:
        value = out[period]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            problems[period] = "expected a number"
        elif value is not None and value <= 0:
            problems[period] = "value must be greater than 0"
    if out["limit_by"] not in ("consumer", "credential", "ip", "service", "header", "path"):
        problems["limit_by"] = (
            'expected one of: consumer, credential, ip, service, header, path'
        )  # fmt: skip
    if out["policy"] not in ("local", "cluster", "redis"):
        problems["policy"] = "expected one of: local, cluster, redis"
    return problems


def _check_entity(out: dict[str, Any]) -> None:
    """The entity checks Kong runs after the fields: one period at least, periods ordered,
    a Redis host for the redis policy."""
    if all(out[p] is None for p in PERIODS):
        raise _schema_violation(
            {"@entity": ["at least one of these fields must be non-empty: 'config.second', "
                         "'config.minute', 'config.hour', 'config.day', 'config.month', "
                         "'config.year'"]},
            "schema violation (at least one of these fields must be non-empty)",
        )  # fmt: skip
    for i, lower in enumerate(PERIODS):
        for upper in PERIODS[i + 1 :]:
            low, high = out[lower], out[upper]
            if low is not None and high is not None and high < low:
                text = (
                    f"The limit for {upper}({high:.1f}) cannot be lower than the limit for "
                    f"{lower}({low:.1f})"
                )
                raise _schema_violation({"config": {"@entity": [text]}}, text)
    if out["policy"] == "redis" and not out["redis"].get("host"):
        raise _schema_violation(
            {"config": {"redis": {"host": "required field missing"}}},
            "schema violation (config.redis.host: required field missing)",
        )


def _merge(target: Any, patch: Any) -> Any:
    """Records merge key by key; null unsets; anything else replaces (Kong's PATCH)."""
    if not isinstance(patch, dict) or not isinstance(target, dict):
        return copy.deepcopy(patch)
    out = dict(target)
    for key, value in patch.items():
        out[key] = None if value is None else _merge(out.get(key), value)
    return out


def _checked_tags(tags: Any) -> list[str] | None:
    if tags is None:
        return None
    if not isinstance(tags, list) or not all(
        isinstance(t, str) and _TAG.fullmatch(t) for t in tags
    ):
        raise _schema_violation(
            {"tags": "invalid tag: expected printable ascii (except `,` and `/`)"},
            "schema violation (tags: invalid tag)",
        )
    return list(dict.fromkeys(tags))


def _tags_match(tags: list[str], wanted: str) -> bool:
    if "/" in wanted:
        return any(t in tags for t in wanted.split("/"))
    return all(t in tags for t in wanted.split(","))


def _size(text: str | None) -> int:
    if text is None:
        return 100
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise KongError(
            400, {"code": 8, "name": "invalid size", "message": "size must be an integer between "
                                                                "1 and 1000"}
        )  # fmt: skip
    return int(text)


def _decode_offset(text: str) -> str:
    try:
        return str(json.loads(base64.b64decode(text))[0])
    except (ValueError, TypeError, IndexError):
        raise KongError(
            400, {"code": 7, "name": "invalid offset", "message": f"'{text}' is not a valid offset"}
        ) from None
