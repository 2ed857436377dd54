"""Fixtures: a loopback Kong Admin API (community or enterprise edition), Kong sinks on it,
and a converge helper that runs reconcile ticks the way the reconciler does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from controller.model import Address
from controller.settings import KongSettings
from controller.sinks.kong import KongSink
from tests.kong.kong_admin import KongAdmin
from tests.support.sink_ticks import Registry

A = Address.parse


@pytest.fixture
def kong() -> Iterator[KongAdmin]:
    server = KongAdmin().start()
    yield server
    server.stop()


@pytest.fixture
def enterprise() -> Iterator[KongAdmin]:
    server = KongAdmin(edition="enterprise", token="s3cret-admin", workspaces=("default", "ai"))
    server.start()
    yield server
    server.stop()


SinkFactory = Callable[..., KongSink]


@pytest.fixture
def make_sink() -> Iterator[SinkFactory]:
    made: list[KongSink] = []

    def make(admin: KongAdmin, registry: Registry | None = None, **options: Any) -> KongSink:
        settings = KongSettings(**{"admin_url": admin.url, "admin_token": admin.token, **options})
        sink = KongSink.from_settings(settings, registry=registry)
        made.append(sink)
        return sink

    yield make
    for sink in made:
        sink.close()


def admin_client(admin: KongAdmin, workspace: str | None = None) -> httpx.Client:
    """An operator's own Admin API client (hand edits)."""
    base = admin.url + (f"/{workspace}" if workspace else "")
    headers = {"Kong-Admin-Token": admin.token} if admin.token else {}
    return httpx.Client(base_url=base, headers=headers)


def add_consumer(admin: KongAdmin, workspace: str | None = None, **fields: str) -> str:
    with admin_client(admin, workspace) as client:
        response = client.post("/consumers", json=fields)
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


def plugins_by_owner(admin: KongAdmin, workspace: str = "default") -> dict[str, dict[str, Any]]:
    """Governor's plugins keyed by their owner tag (`tenant|acme` → plugin)."""
    out: dict[str, dict[str, Any]] = {}
    for plugin in admin.entities("plugins", workspace):
        for tag in plugin.get("tags") or []:
            if tag.startswith("governor-managed|owner|"):
                out[tag.removeprefix("governor-managed|owner|")] = plugin
    return out


def periods(plugin: dict[str, Any]) -> tuple[object, object]:
    """A plugin's (second, minute) limits."""
    return plugin["config"]["second"], plugin["config"]["minute"]
