"""The Kong Admin API sink: Governor's limits as `rate-limiting` plugins on Kong's own entities.

Owners: the global instance (no consumer; or the configured service), one instance per
consumer group named like a plan (Kong Enterprise), one per consumer whose custom_id (or
username) is the tenant id. Governor owns exactly the plugins tagged `<tag>`; the ledger is
kept in the plugin's own tags: `<tag>|owner|tenant|acme`, `<tag>|wrote|<address>|<value>`
(the address with `|` for `/`: ids never hold `|`), `<tag>|version|<n>`. See docs/sinks.md.
"""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import httpx
import redis

from controller.contract.keys import format_value, parse_value
from controller.errors import ConfigurationError, SinkError, untrusted_certificate_hint
from controller.model import Address, AddressError
from controller.settings import KongSettings
from controller.sinks.kong_consumers import ConsumerIndex
from controller.sinks.kong_layout import GLOBAL, PLUGIN, Owner, OwnerKind, restored_protocols
from controller.sinks.kong_plugins import Body, Instance, Listing, PluginSink, WriteRejectedError
from controller.urls import mask_url


class KongAdmin:
    """A small Admin API client: token header, TLS, workspace prefix, errors as SinkError."""

    def __init__(
        self, settings: KongSettings, *, transport: httpx.BaseTransport | None = None
    ) -> None:
        if not settings.admin_url:
            raise ConfigurationError(
                "the kong sink needs the Admin API URL: set GOVERNOR_KONG__ADMIN_URL, e.g. "
                "http://kong-admin.kong.svc:8001"
            )
        self.settings = settings
        base = settings.admin_url.rstrip("/")
        if settings.workspace:
            base += "/" + quote(settings.workspace, safe="")
        # For messages: never the token, nor a password in the URL (a basic-auth proxy).
        self.location = mask_url(base)
        headers = {"Accept": "application/json"}
        if settings.admin_token is not None:
            headers["Kong-Admin-Token"] = settings.admin_token.get_secret_value()
        verify: ssl.SSLContext | bool = settings.verify_tls
        if settings.ca_file is not None:
            verify = ssl.create_default_context(cafile=str(settings.ca_file))
        self.client = httpx.Client(
            base_url=base,
            headers=headers,
            timeout=settings.timeout_seconds,
            transport=transport or httpx.HTTPTransport(verify=verify, retries=2),
        )

    def close(self) -> None:
        self.client.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str | int] | None = None,
        json: Any = None,
    ) -> httpx.Response:
        """One request; transport errors, 401/403 and 5xx raise SinkError."""
        try:
            response = self.client.request(method, path, params=params, json=json)
        except httpx.HTTPError as exc:
            hint = "is GOVERNOR_KONG__ADMIN_URL right and Kong up?"
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                hint = untrusted_certificate_hint("KONG", "the Admin API's")
            raise SinkError(
                f"Kong Admin API at {self.location}: {method} {path} failed: {exc} ({hint})"
            ) from exc
        if response.status_code in (401, 403):
            raise SinkError(
                f"Kong Admin API at {self.location} refused {method} {path} "
                f"({response.status_code}: {message(response)}); check GOVERNOR_KONG__ADMIN_TOKEN "
                "and the token's RBAC role in the workspace"
            )
        if response.status_code >= 500:
            raise SinkError(
                f"Kong Admin API at {self.location}: {method} {path} answered "
                f"{response.status_code}: {message(response)}"
            )
        return response

    def pages(self, path: str, params: Mapping[str, str] | None = None) -> Iterator[dict[str, Any]]:
        """Every entity of a collection, page by page. Follows `offset`, not `next`: Kong's
        `next` path leaves out the workspace prefix."""
        offset: str | None = None
        while True:
            query: dict[str, str | int] = {**(params or {}), "size": self.settings.page_size}
            if offset is not None:
                query["offset"] = offset
            response = self.request("GET", path, params=query)
            if response.status_code != 200:
                raise SinkError(
                    f"Kong Admin API at {self.location}: GET {path} answered "
                    f"{response.status_code}: {message(response)}"
                )
            page = response.json()
            yield from page.get("data") or []
            offset = page.get("offset")
            if not offset or not page.get("next"):
                return


def message(response: httpx.Response) -> str:
    """Kong's error message from a response body (`message`), or the status text."""
    try:
        body = response.json()
    except ValueError:
        return response.reason_phrase
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return response.reason_phrase


class KongStore:
    """Rate-limiting plugins through the Admin API."""

    name = "kong"
    writes_password = True

    def __init__(self, settings: KongSettings, admin: KongAdmin) -> None:
        self.settings = settings
        self.admin = admin
        self.location = admin.location
        self.tag = settings.tag
        self._edition: str | None = None
        # tenant ↔ consumer, for one pass only (kong_consumers: operators edit consumers)
        self._consumers = ConsumerIndex(admin, settings.consumer_match, settings.page_size)

    @property
    def groups(self) -> bool:
        if self.settings.consumer_groups == "auto":
            return self.edition() == "enterprise"
        return self.settings.consumer_groups == "on"

    def edition(self) -> str:
        """`enterprise` or `community`, from `GET /` (asked once)."""
        if self._edition is None:
            self._edition = str(self._node().get("edition") or "community")
        return self._edition

    def _node(self) -> dict[str, Any]:
        response = self.admin.request("GET", "/")
        if response.status_code != 200:
            raise SinkError(
                f"Kong Admin API at {self.location}: GET / answered {response.status_code}: "
                f"{message(response)} (is GOVERNOR_KONG__WORKSPACE right?)"
            )
        node: dict[str, Any] = response.json()
        return node

    def check(self) -> None:
        """The Admin API answers with this token, offers rate-limiting, and the edition fits."""
        node = self._node()
        self._edition = str(node.get("edition") or "community")
        available = (node.get("plugins") or {}).get("available_on_server") or {}
        if PLUGIN not in available:
            raise SinkError(
                f"Kong at {self.location} does not offer the {PLUGIN} plugin: add it to "
                "KONG_PLUGINS (bundled is the default)"
            )
        if self.settings.consumer_groups == "on" and self._edition != "enterprise":
            raise SinkError(
                f"Kong at {self.location} is the {self._edition} edition: consumer groups need "
                "Kong Enterprise; set GOVERNOR_KONG__CONSUMER_GROUPS=off (plans are then folded "
                "into each tenant's consumer plugin)"
            )
        next(self.admin.pages("/plugins", {"tags": self.tag}), None)

    # --- reading ------------------------------------------------------------------------------

    def listing(self) -> Listing:
        self._consumers.start()  # a new pass: no consumer is trusted from the last one
        parsed: list[Instance] = []
        foreign: list[str] = []
        for plugin in self.admin.pages("/plugins", {"tags": self.tag}):
            instance, problem = self._parse(plugin)
            if instance is None:
                foreign.append(f"kong plugin {plugin.get('id')}: {problem}")
            else:
                parsed.append(instance)
        self._consumers.load({i.handle["consumer"] for i in parsed if i.handle["consumer"]})
        instances: dict[Owner, Instance] = {}
        strays: list[Instance] = []
        # The instance on its tenant's consumer first: of several claiming one tenant, it is
        # kept and the others (on consumers no longer the tenant's) are removed.
        for instance in sorted(map(self._checked, parsed), key=lambda i: bool(i.stale)):
            if instance.owner not in instances:
                instances[instance.owner] = instance
            elif instance.stale:
                strays.append(instance)
            else:
                second = f"a second instance for {instance.owner}"
                foreign.append(f"kong plugin {instance.ref}: {second}")
        return Listing(instances, tuple(foreign), tuple(strays))

    def _checked(self, instance: Instance) -> Instance:
        """The instance, marked stale when the consumer it sits on is no longer its tenant's
        (a custom_id moved by hand, the consumer deleted): it limits someone else, or no one."""
        tenant, consumer = instance.owner.id, instance.handle["consumer"]
        if instance.owner.kind is not OwnerKind.TENANT or consumer is None:
            return instance
        carried = self._consumers.tenant_of(consumer)
        if carried == tenant:
            return instance
        field = self.settings.consumer_match
        if not self._consumers.exists(consumer):
            now = "no longer exists"
        elif carried is None:
            now = f"has no {field} now"
        else:
            now = f"has {field} {carried!r} now"
        where = f"plugin {instance.ref} of tenant {tenant!r} sits on consumer {consumer}"
        return dataclasses.replace(instance, stale=f"{where}, which {now}")

    def _parse(self, plugin: Mapping[str, Any]) -> tuple[Instance | None, str]:
        owner: Owner | None = None
        written: dict[Address, float] = {}
        version = 0
        for tag in plugin.get("tags") or []:
            if not str(tag).startswith(self.tag + "|"):
                continue
            kind, _, rest = str(tag).removeprefix(self.tag + "|").partition("|")
            try:
                if kind == "owner":
                    owner = Owner.parse(rest.replace("|", "/"))
                elif kind == "wrote":
                    text, _, value = rest.rpartition("|")
                    written[Address.parse(text.replace("|", "/"))] = parse_value(value)
                elif kind == "version":
                    version = int(rest)
            except (ValueError, AddressError):
                return None, f"tag {tag!r} is not one Governor writes"
        if plugin.get("name") != PLUGIN or owner is None:
            return None, f"tagged {self.tag!r} but not a {PLUGIN} plugin with an owner tag"
        problem = self._scope_problem(plugin, owner)
        if problem and not (owner == GLOBAL and problem == "misplaced"):
            return None, problem
        config = plugin.get("config") or {}
        enabled = plugin.get("enabled") is not False
        handle = {
            "id": plugin["id"],
            "consumer": _ref(plugin, "consumer"),
            "misplaced": problem == "misplaced",
            "protocols": restored_protocols(plugin.get("protocols")),
        }
        return Instance(owner, str(plugin["id"]), config, written, enabled, version, handle), ""

    def _scope_problem(self, plugin: Mapping[str, Any], owner: Owner) -> str:
        """Why the plugin's scope does not fit its owner tag ('' when it does)."""
        consumer, group = _ref(plugin, "consumer"), _ref(plugin, "consumer_group")
        service, route = _ref(plugin, "service"), _ref(plugin, "route")
        if route is not None:
            return f"scoped to route {route}, which Governor never does"
        if owner.kind is OwnerKind.GLOBAL:
            if consumer is not None or group is not None:
                return "tagged global but scoped to a consumer or group"
            return "misplaced" if (service is None) != (self.settings.service is None) else ""
        if service is not None:
            return f"tagged {owner} but scoped to service {service}"
        if owner.kind is OwnerKind.PLAN:
            return "" if group is not None and consumer is None else f"tagged {owner}, no group"
        if consumer is None or group is not None:
            return f"tagged {owner} but not scoped to one consumer"
        return ""  # which consumer: checked against Kong's consumers in listing (_checked)

    # --- writing ------------------------------------------------------------------------------

    def resolve(self, owners: Sequence[Owner]) -> dict[Owner, str]:
        blocked: dict[Owner, str] = {}
        for owner in owners:
            if owner.kind is not OwnerKind.TENANT or owner.id is None:
                continue
            if self.consumer(owner.id) is None and not self.settings.create_consumers:
                blocked[owner] = self._no_consumer(owner.id)
        return blocked

    def _no_consumer(self, tenant: str) -> str:
        field = self.settings.consumer_match
        return (
            f"tenant {tenant!r} has no Kong consumer with {field} {tenant!r} at "
            f"{self.location}: give its consumer that {field} (or create one), or set "
            "GOVERNOR_KONG__CREATE_CONSUMERS=true; its limits wait until then"
        )

    def consumer(self, tenant: str) -> str | None:
        """The id of the tenant's consumer, matched exactly on custom_id (or username), as
        Kong holds it in this pass."""
        return self._consumers.consumer_of(tenant)

    def create(self, body: Body) -> None:
        payload = {"name": PLUGIN, "config": body.config, "tags": self._tags(body), "enabled": True}
        path = "/plugins"
        if body.owner.kind is OwnerKind.GLOBAL and self.settings.service:
            path = "/services/" + quote(self.settings.service, safe="") + "/plugins"
        elif body.owner.kind is OwnerKind.PLAN and body.owner.id is not None:
            payload["consumer_group"] = {"id": self._group(body.owner.id)}
        elif body.owner.kind is OwnerKind.TENANT and body.owner.id is not None:
            payload["consumer"] = {"id": self._consumer_for_write(body.owner.id)}
        response = self.admin.request("POST", path, json=payload)
        if response.status_code != 201:
            # A consumer deleted since the listing is a 400 (foreign key): the next pass
            # looks the tenant's consumer up afresh and writes again.
            raise WriteRejectedError(
                f"Kong refused the {PLUGIN} plugin for {body.owner} ({response.status_code}): "
                f"{message(response)}" + _conflict_hint(response)
            )

    def update(self, instance: Instance, body: Body) -> None:
        if instance.handle["misplaced"]:  # the service setting changed: move it
            self.delete(instance)
            self.create(body)
            return
        if instance.stale:
            self._move(instance, body)
            return
        payload = {"config": body.config, "tags": self._tags(body), "enabled": True}
        if instance.handle["protocols"] is not None:
            payload["protocols"] = instance.handle["protocols"]
        path = "/plugins/" + quote(instance.ref, safe="")
        response = self.admin.request("PATCH", path, json=payload)
        if response.status_code != 200:
            raise WriteRejectedError(
                f"Kong refused the update of plugin {instance.ref} ({instance.owner}, "
                f"{response.status_code}): {message(response)}"
            )

    def _move(self, instance: Instance, body: Body) -> None:
        """Put a tenant's plugin left on another consumer onto the tenant's consumer, with its
        config and ledger, in one PATCH: the limit is never on both consumers nor on neither."""
        tenant = str(instance.owner.id)
        consumer = self._consumer_for_write(tenant)
        payload: dict[str, Any] = {
            "consumer": {"id": consumer},
            "config": body.config,
            "tags": self._tags(body),
            "enabled": True,
        }
        if instance.handle["protocols"] is not None:
            payload["protocols"] = instance.handle["protocols"]
        path = "/plugins/" + quote(instance.ref, safe="")
        response = self.admin.request("PATCH", path, json=payload)
        if response.status_code == 200:
            return
        # Refused (409: the tenant's consumer holds another rate-limiting plugin, e.g. the
        # stale one of a tenant whose custom_id was swapped with this one's). The limit must
        # not stay on a consumer that is not the tenant's: removed now, created next pass.
        self.delete(instance)
        raise WriteRejectedError(
            f"{instance.stale}; moving it to consumer {consumer} was refused "
            f"({response.status_code}: {message(response)}), so it was removed and tenant "
            f"{tenant!r}'s limit is written on the next pass" + _conflict_hint(response)
        )

    def delete(self, instance: Instance) -> None:
        response = self.admin.request("DELETE", "/plugins/" + quote(instance.ref, safe=""))
        if response.status_code not in (200, 204, 404):
            raise WriteRejectedError(
                f"Kong refused to delete plugin {instance.ref} ({response.status_code}): "
                f"{message(response)}"
            )

    def differences(self, instance: Instance, body: Body) -> list[str]:
        why = ["scope (GOVERNOR_KONG__SERVICE changed)"] if instance.handle["misplaced"] else []
        why += [f"consumer ({instance.stale})"] if instance.stale else []
        return why + (["protocols"] if instance.handle["protocols"] is not None else [])

    def close(self) -> None:
        self.admin.close()

    def _tags(self, body: Body) -> list[str]:
        owner = str(body.owner).replace("/", "|")
        wrote = [
            f"{self.tag}|wrote|{str(address).replace('/', '|')}|{format_value(value)}"
            for address, value in sorted(body.written.items())
        ]
        return [self.tag, f"{self.tag}|owner|{owner}", *wrote, f"{self.tag}|version|{body.version}"]

    def _ownership_tags(self, owner: Owner) -> list[str]:
        return [self.tag, f"{self.tag}|owner|{str(owner).replace('/', '|')}"]

    def _consumer_for_write(self, tenant: str) -> str:
        found = self.consumer(tenant)
        if found is not None:
            return found
        if not self.settings.create_consumers:
            raise WriteRejectedError(self._no_consumer(tenant))
        payload = {
            self.settings.consumer_match: tenant,
            "tags": self._ownership_tags(Owner(OwnerKind.TENANT, tenant)),
        }
        response = self.admin.request("POST", "/consumers", json=payload)
        if response.status_code == 201:
            self._consumers.remember(response.json())
            return str(response.json()["id"])
        self._consumers.start()  # 409: created meanwhile; look again, not at this pass's answer
        found = self.consumer(tenant)
        if found is None:
            raise WriteRejectedError(
                f"Kong refused consumer {tenant!r} ({response.status_code}): {message(response)}"
            )
        return found

    def _group(self, plan: str) -> str:
        """The id of the consumer group named `plan`; created (tagged) when missing."""
        for group in self.admin.pages("/consumer_groups"):
            if group.get("name") == plan:
                return str(group["id"])
        payload = {"name": plan, "tags": self._ownership_tags(Owner(OwnerKind.PLAN, plan))}
        response = self.admin.request("POST", "/consumer_groups", json=payload)
        if response.status_code != 201:
            raise WriteRejectedError(
                f"Kong refused consumer group {plan!r} ({response.status_code}): "
                f"{message(response)}"
            )
        created = response.json()
        return str((created.get("consumer_group") or created)["id"])


def _ref(plugin: Mapping[str, Any], name: str) -> str | None:
    value = plugin.get(name)
    if isinstance(value, Mapping) and value.get("id"):
        return str(value["id"])
    return None


def _conflict_hint(response: httpx.Response) -> str:
    if response.status_code != 409:
        return ""
    return (
        "; a rate-limiting plugin Governor does not own already sits there: delete it, or "
        "add the ownership tag so Governor takes it over"
    )


class KongSink(PluginSink):
    """Limits as Kong rate-limiting plugins through the Admin API (docs/sinks.md)."""

    @classmethod
    def from_settings(
        cls,
        settings: KongSettings,
        *,
        registry: Callable[[], Mapping[str, str]] | None = None,
        fence_client: redis.Redis[str] | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> KongSink:
        store = KongStore(settings, KongAdmin(settings, transport=transport))
        return cls(store, settings, registry=registry, fence_client=fence_client)
