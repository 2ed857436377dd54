"""Build the sinks named in `controller.sinks`; the daemon runs one reconciler per sink."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import redis

from controller.clients.redis import key_schema
from controller.errors import ConfigurationError
from controller.model import Address
from controller.settings import Settings
from controller.sinks import Sink, sink_from_url
from controller.sinks.redis import RedisSink


@runtime_checkable
class LimitFilter(Protocol):
    """A sink that cannot hold every limit kind (Kong): the reconciler should leave the
    addresses it names out of that sink's desired state, and report them once."""

    def unsupported_reason(self, address: Address) -> str | None:
        """Why this sink cannot hold `address`; None when it can."""
        ...


def split_supported(
    sink: Sink, decisions: Mapping[Address, Any]
) -> tuple[dict[Address, Any], dict[Address, str]]:
    """(the decisions `sink` can hold, the others with why). Call it before a sink's
    reconcile tick so an unsupported limit is reported once, not journalled as a change
    every tick; every decision is kept for a sink that holds all kinds."""
    if not isinstance(sink, LimitFilter):
        return dict(decisions), {}
    kept: dict[Address, Any] = {}
    skipped: dict[Address, str] = {}
    for address, decision in decisions.items():
        reason = sink.unsupported_reason(address)
        if reason is None:
            kept[address] = decision
        else:
            skipped[address] = reason
    return kept, skipped


def build_sinks(
    settings: Settings,
    redis_client: redis.Redis[str],
    *,
    registry: Callable[[], Mapping[str, str]],
    kube_api: Any = None,
    kong_transport: Any = None,
) -> list[Sink]:
    """The sinks of `settings.controller.sinks`, in that order.

    `redis_client` is Governor's own Redis: the `redis` sink and the leader fence;
    `registry` reads tenant → plan (Kong and Kubernetes fold plan limits into consumers).
    `kube_api` (an ApiClient) and `kong_transport` (an httpx transport) replace the real
    connections in tests.
    Raises ConfigurationError naming the setting to fix.
    """
    keys = key_schema(redis_client, settings.redis.key_prefix)
    sinks: list[Sink] = []
    api = kube_api
    for entry in settings.controller.sinks:
        if entry == "redis":
            sinks.append(RedisSink(redis_client, keys))
        elif entry == "kong":
            sinks.append(_kong(settings, registry, redis_client, kong_transport))
        elif entry in ("kubernetes", "configmap"):
            api = api if api is not None else _kube_api(settings)
            sinks.append(_kubernetes(entry, settings, api, registry, redis_client))
        else:
            sinks.append(sink_from_url(entry, settings.redis, fence_client=redis_client))
    return sinks


def sink_label(sink: Sink) -> str:
    """A short name for logs, metrics and drift reports: `redis`, `kong`, `kubernetes`..."""
    name = getattr(sink, "name", None)
    return name if isinstance(name, str) else type(sink).__name__.removesuffix("Sink").lower()


def _kong(
    settings: Settings,
    registry: Callable[[], Mapping[str, str]],
    redis_client: redis.Redis[str],
    transport: Any,
) -> Sink:
    from controller.sinks.kong import KongSink

    if not settings.kong.admin_url:
        raise ConfigurationError(
            "the kong sink needs GOVERNOR_KONG__ADMIN_URL (the Admin API, e.g. "
            "http://kong-admin.kong.svc:8001)"
        )
    return KongSink.from_settings(
        settings.kong, registry=registry, fence_client=redis_client, transport=transport
    )


def _kube_api(settings: Settings) -> Any:
    from controller.sinks.kubernetes import api_client

    return api_client(settings.kubernetes_sink)


def _kubernetes(
    entry: str,
    settings: Settings,
    api: Any,
    registry: Callable[[], Mapping[str, str]],
    redis_client: redis.Redis[str],
) -> Sink:
    from controller.sinks.configmap import ConfigMapSink
    from controller.sinks.kubernetes import KubernetesSink, sink_namespace

    namespace = sink_namespace(settings.kubernetes_sink)
    if entry == "configmap":
        return ConfigMapSink(
            settings.kubernetes_sink, api, namespace=namespace, fence_client=redis_client
        )
    return KubernetesSink.from_settings(
        settings.kubernetes_sink,
        settings.kong,
        api,
        namespace=namespace,
        registry=registry,
        fence_client=redis_client,
    )
