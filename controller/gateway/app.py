"""The reference gateway: an OpenAI-compatible reverse proxy with Governor's enforcement."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import signal
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import FrameType
from urllib.parse import urlsplit, urlunsplit

import httpx
import redis.asyncio
import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import SecretStr
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route

from controller.clients.redis import (
    aclose,
    connect_async,
    connection_hint,
    key_schema,
    refuse_cluster_url,
    url_from_settings,
    write_retry_async,
)
from controller.contract.catalog import PlanInfo
from controller.errors import ConfigurationError
from controller.gateway.admission import Admission
from controller.gateway.asgi import STORE_ERRORS, Enforcement, GovernorMiddleware
from controller.gateway.auth import Authenticator, JwksCache
from controller.gateway.catalog import PlanCatalog
from controller.gateway.failmode import FailMode, LimitMemory, LocalLimiter, Presence
from controller.gateway.keys import KeyVerifier
from controller.gateway.metrics import GatewayMetrics
from controller.gateway.prices import PriceTable
from controller.gateway.proxy import UpstreamProxy
from controller.gateway.responses import Answers
from controller.gateway.tracing import Tracing
from controller.settings import Settings
from controller.urls import mask_url

_log = structlog.get_logger("governor.gateway")


@dataclass(frozen=True)
class FixedPlans:
    """Plans given at start (`governor gateway --policies DIR`) instead of read from Redis:
    each plan's catalog terms and its limits (which fail-open needs before any tick)."""

    version: str
    terms: Mapping[str, PlanInfo]
    limits: Mapping[str, Mapping[str, float]]


@dataclass
class GatewayRuntime:
    """Everything a gateway process holds, built from settings; mount `enforcement` with
    GovernorMiddleware in any Starlette/FastAPI app and run `running()` in its lifespan."""

    settings: Settings
    client: redis.asyncio.Redis[str]
    http: httpx.AsyncClient
    presence: Presence
    enforcement: Enforcement

    @classmethod
    def from_settings(cls, settings: Settings, plans: FixedPlans | None = None) -> GatewayRuntime:
        """With `plans` (from a policy directory), plans come from there, not `<P>:plans`."""
        gateway = settings.gateway
        url = url_from_settings(settings)
        refuse_cluster_url(url, settings.redis)  # ConfigurationError: the gateway exits 2
        client = connect_async(url, settings.redis)
        keys = key_schema(client, settings.redis.key_prefix)
        http = httpx.AsyncClient(
            timeout=httpx.Timeout(gateway.upstream_timeout_seconds, connect=10.0),
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )
        secret = gateway.api_key_secret.get_secret_value() if gateway.api_key_secret else None
        verifier = KeyVerifier(client, keys, secret, gateway.key_cache_seconds)
        jwks = None
        if gateway.jwt_jwks_url:
            jwks = JwksCache(gateway.jwt_jwks_url, http, gateway.jwks_cache_seconds)
        prices = PriceTable.from_settings(settings.prices)
        memory = LimitMemory()
        catalog = PlanCatalog(client, keys.prefix)
        if plans is not None:
            catalog = PlanCatalog.fixed(client, keys.prefix, plans.terms, plans.version)
            for name, rates in plans.limits.items():  # fail-open knows each plan's rates
                memory.set_plan(name, dict(rates))
        gateway_id = gateway.gateway_id or f"{socket.gethostname()}:{os.getpid()}"
        presence = Presence(client, keys, gateway_id, gateway.heartbeat_seconds)
        enforcement = Enforcement(
            settings=gateway,
            authenticator=Authenticator(gateway, verifier, jwks),
            admission=Admission(client, keys.prefix, prices, catalog),
            catalog=catalog,
            failmode=FailMode(presence, memory, LocalLimiter()),
            prices=prices,
            metrics=GatewayMetrics(
                gateway.metrics_max_tenants,
                gateway.metrics_max_models,
                known_model=lambda model: model in prices.models or catalog.names(model),
            ),
            answers=Answers(gateway.problem_base_url, gateway.retry_after_jitter),
            tracing=Tracing(gateway.otlp_endpoint) if gateway.otlp_endpoint else None,
            record_retry=write_retry_async(settings.redis, STORE_ERRORS),
        )
        return cls(settings, client, http, presence, enforcement)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Heartbeat while the block runs; then leave the count and close every client."""
        task = asyncio.create_task(self._heartbeat())
        try:
            yield
        finally:
            task.cancel()
            held = self.enforcement.pending
            if len(held):  # a last try: what stays held now is lost with the process
                await held.retry()
                if len(held):
                    _log.error("stopping with store calls held; their usage is not charged",
                               calls=len(held))  # fmt: skip
            with contextlib.suppress(*STORE_ERRORS):  # the entry expires after 3 beats anyway
                await self.presence.leave()
            await self.http.aclose()
            await aclose(self.client)
            if self.enforcement.tracing is not None:
                self.enforcement.tracing.shutdown()

    async def catalog_state(self) -> str:
        """The plan catalog as the start line says it: its version and size, or why none."""
        catalog = self.enforcement.catalog
        if catalog.refresh_seconds != float("inf"):  # read from Redis: read it now
            try:
                await catalog.refresh()
            except STORE_ERRORS as exc:
                return f"none yet (the limit store is unreachable: {exc}); every request is refused"
        if not catalog.plans:
            return (
                "none yet (no controller has published one); every request is refused 503 "
                "not-configured until it does"
            )
        return f"{catalog.version or 'unversioned'} ({len(catalog.plans)} plans)"

    async def _heartbeat(self) -> None:
        metrics = self.enforcement.metrics
        keys = key_schema(self.client, self.settings.redis.key_prefix)
        while True:
            try:
                metrics.live_gateways.set(await self.presence.heartbeat())
                await self.enforcement.failmode.refresh_plans(self.client, keys)
                await self.enforcement.pending.retry()
            except STORE_ERRORS as exc:
                metrics.store_errors.labels("heartbeat").inc()
                _log.warning(
                    "heartbeat failed; keeping the last gateway count",
                    error=f"{exc}{connection_hint(exc)}",
                )
            await asyncio.sleep(self.settings.gateway.heartbeat_seconds)


def create_app(
    settings: Settings, upstream: str, plans: FixedPlans | None = None, listen: str | None = None
) -> Starlette:
    """The gateway app: `/v1/*` proxied to `upstream` under enforcement, plus `/metrics` and
    `/healthz`. It logs one line when it starts (where it listens — `listen`, default the
    settings' host:port —, the upstream, the plan catalog) and one when it has stopped."""
    runtime = GatewayRuntime.from_settings(settings, plans)
    where = listen or f"{settings.gateway.host}:{settings.gateway.port}"
    e = runtime.enforcement
    gateway = settings.gateway
    api_key = gateway.upstream_api_key.get_secret_value() if gateway.upstream_api_key else None
    proxy = UpstreamProxy(upstream, runtime.http, e.answers, api_key, e.tracing)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with runtime.running():
            catalog = await runtime.catalog_state()
            # Said by the server once it listens (`_DrainingServer.startup`): the app starts
            # before the port is bound, and a taken port must not read as listening.
            app.state.start_line = (
                f"governor gateway listening on http://{where}, upstream {_shown(upstream)}, "
                f"plan catalog {catalog}"
            )
            yield
        _log.info("governor gateway stopped (in-flight requests drained, held charges tried)")

    async def metrics_endpoint(request: Request) -> Response:
        if not scrape_allowed(gateway.metrics_token, request.headers.get("authorization")):
            return PlainTextResponse(
                "401: /metrics needs Authorization: Bearer <GOVERNOR_GATEWAY__METRICS_TOKEN>",
                status_code=401,
                headers={"www-authenticate": 'Bearer realm="metrics"'},
            )
        e.metrics.expire()  # background responses whose lease ended are no longer held
        return Response(generate_latest(e.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[
            Route("/metrics", metrics_endpoint),
            Route("/healthz", healthz),
            Mount("/", app=proxy),
        ],
        middleware=[Middleware(GovernorMiddleware, enforcement=e)],
        lifespan=lifespan,
    )


def scrape_allowed(token: SecretStr | None, authorization: str | None) -> bool:
    """Whether a scrape may read /metrics: always without a token; with one, only a request
    bearing it (compared in constant time: the answer must not leak it byte by byte)."""
    if token is None:
        return True
    scheme, _, given = (authorization or "").partition(" ")
    expected = token.get_secret_value().encode()
    given = given.strip(" \t")  # as a key is: no other byte around it makes it match
    # An empty token (a Secret's empty key) matches no scrape: `Bearer` alone must not pass.
    return (
        scheme.lower() == "bearer" and bool(given) and hmac.compare_digest(given.encode(), expected)
    )


def _shown(url: str) -> str:
    """An upstream URL for a log line: no user info, query or fragment (they may hold a key)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host  # IPv6
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def require_upstream(url: str) -> str:
    """An upstream URL, or ConfigurationError saying what shape it must have (the URL shown
    masked: a mistyped one may hold a password where no URL parser finds it)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"--upstream {mask_url(url)!r} must be an http(s) URL of the model server's root, "
            "e.g. http://127.0.0.1:8000 (the gateway appends /v1/...)"
        )
    root = parts.path.rstrip("/")
    if root.endswith("/v1"):  # an OpenAI "base URL": every request would go to /v1/v1/...
        fixed = mask_url(urlunsplit(parts._replace(path=root.removesuffix("/v1"))))
        raise ConfigurationError(
            f"--upstream {mask_url(url)!r} ends in /v1, which the gateway appends itself "
            f"(requests would go to /v1/v1/... and fail 404): give the server's root, {fixed}"
        )
    return url


class _DrainingServer(uvicorn.Server):
    """uvicorn's server, saying when it listens and when a stop begins (its own lines are
    below our log level)."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        line = getattr(getattr(self.config.app, "state", None), "start_line", None)
        if self.started and line:
            _log.info(line)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.should_exit:
            _log.info(
                f"governor gateway stopping on signal {sig}: no new connections; in-flight "
                f"requests may finish for {self.config.timeout_graceful_shutdown} s"
            )
        super().handle_exit(sig, frame)


def serve(app: Starlette, host: str, port: int, drain_seconds: int) -> bool:
    """Serve `app` until SIGTERM or SIGINT, then drain: stop accepting, let in-flight
    requests finish for up to `drain_seconds`, run the app's shutdown. False when the server
    never started (e.g. the port is taken)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",  # our own structlog lines say what matters
        ws="none",
        proxy_headers=False,  # the client IP comes from GOVERNOR_GATEWAY__TRUST_FORWARDED_FOR
        server_header=False,
        lifespan="on",
        timeout_graceful_shutdown=drain_seconds,
    )
    server = _DrainingServer(config)
    # After draining, uvicorn raises the signal again under the handler that was there
    # before it: with Python's default, a cleanly drained gateway died of SIGTERM (exit 143).
    # The server's own handler is that handler now: one more call only notes the signal.
    signal.signal(signal.SIGTERM, server.handle_exit)
    try:
        server.run()
    except SystemExit:  # uvicorn's own exit when it cannot listen (it logged the OSError)
        _log.error(f"governor gateway could not listen on {host}:{port}: see the error above")
        return False
    return server.started
