"""Redis connections from a URL and settings; Redis errors become SinkError naming the server."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.retry import Retry

from controller.errors import ConfigurationError, SinkError, untrusted_certificate_hint
from controller.settings import RedisSettings, Settings
from controller.urls import mask_url

SCHEMES = ("redis", "rediss", "unix", "redis+sentinel", "rediss+sentinel")
_SENTINEL = ("redis+sentinel", "rediss+sentinel")
_PLANNED = {"redis+cluster": "Cluster"}
_BACKOFF_CAP_SECONDS = 2.0
_SENTINEL_PORT = 26379
_SENTINEL_EXAMPLE = "redis+sentinel://:password@sentinel-0:26379,sentinel-1:26379/mymaster/0"


def masked_url(url: str) -> str:
    """The URL with any password masked (safe for logs and messages): `mask_url`."""
    return mask_url(url)


def url_from_settings(settings: Settings) -> str:
    """The configured Redis URL, or ConfigurationError saying which variable to set."""
    if settings.redis.url is None:
        raise ConfigurationError(
            "no Redis configured: set GOVERNOR_REDIS__URL, e.g. redis://127.0.0.1:6379/0 "
            "(rediss:// for TLS, unix:///path/to/redis.sock for a socket, "
            f"{_SENTINEL_EXAMPLE} for Sentinel)"
        )
    return settings.redis.url.get_secret_value()


@dataclass(frozen=True)
class SentinelTarget:
    """What a `redis+sentinel://` URL names: the Sentinels to ask, the master's service
    name and database, and the credentials of the data nodes and of the Sentinels."""

    sentinels: list[tuple[str, int]]
    service: str
    db: int
    username: str | None
    password: str | None
    sentinel_password: str | None


def parse_sentinel_url(url: str) -> SentinelTarget:
    """`redis+sentinel://[user:password@]host[:port][,host[:port]...]/service[/db]
    [?sentinel_password=...]`; ConfigurationError naming what is wrong."""

    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(
            f"Redis Sentinel URL {masked_url(url)!r}: {why}; expected e.g. {_SENTINEL_EXAMPLE}"
        )

    parts = urlsplit(url)
    auth, _, hosts = parts.netloc.rpartition("@")
    username, _, password = auth.partition(":") if auth else ("", "", "")
    sentinels = []
    for entry in filter(None, hosts.split(",")):
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if not port.isdigit() and port:
            raise bad(f"port {port!r} of {entry!r} is not a number")
        sentinels.append((host, int(port) if port else _SENTINEL_PORT))
    if not sentinels:
        raise bad("no Sentinel host")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise bad("the path must be /<master service name>[/<db>]")
    if len(path) == 2 and not path[1].isdigit():
        raise bad(f"database {path[1]!r} is not a number")
    query = parse_qs(parts.query)
    unknown = set(query) - {"sentinel_password"}
    if unknown:
        raise bad(f"unknown parameter {', '.join(sorted(unknown))} (only sentinel_password)")
    return SentinelTarget(
        sentinels=sentinels,
        service=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) or None,
        sentinel_password=query.get("sentinel_password", [None])[0],
    )


def client_options(url: str, settings: RedisSettings) -> dict[str, Any]:
    """What every Governor client (sync or async) sets: decoded answers, timeouts, the login
    from settings (it wins over the URL's), TLS for rediss:// and rediss+sentinel://."""
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
    }
    if settings.username is not None:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if urlsplit(url).scheme.startswith("rediss"):
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if settings.verify_tls else ssl.CERT_NONE
        if settings.ca_file is not None:
            options["ssl_ca_certs"] = str(settings.ca_file)
    return options


def _check_scheme(url: str) -> str:
    scheme = urlsplit(url).scheme
    if scheme in _PLANNED:
        raise ConfigurationError(
            f"Redis {_PLANNED[scheme]} URLs are not supported yet ({masked_url(url)}); "
            "use redis://, rediss://, unix:// or redis+sentinel://"
        )
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"Redis URL {masked_url(url)!r} has scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + " (set GOVERNOR_REDIS__URL)"
        )
    return scheme


def _sentinel_setup(url: str, options: dict[str, Any]) -> tuple[SentinelTarget, dict[str, Any]]:
    """The target, and the options of the connections to the Sentinels themselves (same
    timeouts and TLS as the data nodes, their own password if the URL gives one)."""
    target = parse_sentinel_url(url)
    if target.username is not None:
        options.setdefault("username", target.username)
    if target.password is not None:
        options.setdefault("password", target.password)
    options["ssl"] = urlsplit(url).scheme == "rediss+sentinel"
    own = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))}
    if target.sentinel_password is not None:
        own["password"] = target.sentinel_password
    return target, own


def connect(url: str, settings: RedisSettings, *, retries: int | None = None) -> redis.Redis[str]:
    """A client for `url` (redis://, rediss://, unix://, redis+sentinel://);
    `retries` overrides settings.retries.

    Retries cover connection errors and timeouts only, with exponential backoff; MULTI/EXEC
    makes a retried transaction all-or-nothing. Behind Sentinel a failover is such an error
    for a moment: the retry asks the Sentinels for the new master.
    """
    scheme = _check_scheme(url)
    count = settings.retries if retries is None else retries
    options = client_options(url, settings)
    options["retry"] = Retry(
        ExponentialBackoff(cap=_BACKOFF_CAP_SECONDS, base=settings.retry_backoff_seconds), count
    )
    options["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError]
    try:
        if scheme in _SENTINEL:
            target, own = _sentinel_setup(url, options)
            manager = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=own, **options)
            return manager.master_for(target.service, db=target.db)
        return redis.Redis.from_url(url, **options)
    except (ValueError, redis.RedisError) as exc:
        raise ConfigurationError(f"Redis URL {masked_url(url)!r}: {exc}") from None


def connect_async(url: str, settings: RedisSettings) -> redis.asyncio.Redis[str]:
    """An async client for the gateway (same URLs and settings as `connect`) that fails
    fast: an admission that cannot reach Redis goes to the plan's fail mode at once instead
    of waiting through retries (redis-py's default retries 10 times, each up to the timeout)."""
    scheme = _check_scheme(url)
    options = client_options(url, settings)
    options["retry"] = redis.asyncio.retry.Retry(NoBackoff(), 0)
    try:
        if scheme in _SENTINEL:
            target, own = _sentinel_setup(url, options)
            manager = redis.asyncio.sentinel.Sentinel(
                target.sentinels, sentinel_kwargs=own, **options
            )
            return manager.master_for(target.service, db=target.db)
        return redis.asyncio.Redis.from_url(url, **options)
    except (ValueError, redis.RedisError) as exc:
        raise ConfigurationError(f"Redis URL {masked_url(url)!r}: {exc}") from None


def close(client: redis.Redis[str]) -> None:
    """Close a client and, behind Sentinel, its connections to the Sentinels."""
    client.close()
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        pool.disconnect()
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()
            sentinel.connection_pool.disconnect()


async def aclose(client: redis.asyncio.Redis[str]) -> None:
    """Close an async client and, behind Sentinel, its connections to the Sentinels."""
    await client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose
    pool = client.connection_pool
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()  # type: ignore[attr-defined]


def location(client: redis.Redis[str]) -> str:
    """Where a client points, without credentials, for error messages."""
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        return f"the master of Sentinel service {pool.service_name!r}"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


@contextmanager
def wrapped(client: redis.Redis[str], action: str) -> Iterator[None]:
    """Turn any Redis client error inside the block into a SinkError naming server and action."""
    try:
        yield
    except redis.ResponseError as exc:
        hint = ""
        if "WRONGTYPE" in str(exc):
            hint = (
                " (a key Governor owns was replaced by hand with another type: "
                "delete it and Governor rewrites it on the next tick)"
            )
        raise SinkError(f"Redis at {location(client)}: {action} failed: {exc}{hint}") from exc
    except redis.RedisError as exc:
        hint = "is the server up and GOVERNOR_REDIS__URL right?"
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            hint = untrusted_certificate_hint("REDIS", "the server's")
        raise SinkError(f"Redis at {location(client)}: {action} failed: {exc} ({hint})") from exc
