"""Redis connections from a URL and settings; Redis errors become SinkError naming the server."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from controller.errors import ConfigurationError, SinkError
from controller.settings import RedisSettings, Settings

SCHEMES = ("redis", "rediss", "unix")
_PLANNED = {"redis+sentinel": "Sentinel", "redis+cluster": "Cluster"}
_BACKOFF_CAP_SECONDS = 2.0


def masked_url(url: str) -> str:
    """The URL with any password replaced by '****' (safe for logs and messages)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:****@{host}"))


def url_from_settings(settings: Settings) -> str:
    """The configured Redis URL, or ConfigurationError saying which variable to set."""
    if settings.redis.url is None:
        raise ConfigurationError(
            "no Redis configured: set GOVERNOR_REDIS__URL, e.g. redis://127.0.0.1:6379/0 "
            "(rediss:// for TLS, unix:///path/to/redis.sock for a socket)"
        )
    return settings.redis.url.get_secret_value()


def connect(url: str, settings: RedisSettings, *, retries: int | None = None) -> redis.Redis[str]:
    """A client for `url` (redis://, rediss://, unix://); `retries` overrides settings.retries.

    Retries cover connection errors and timeouts only, with exponential backoff; MULTI/EXEC
    makes a retried transaction all-or-nothing.
    """
    scheme = urlsplit(url).scheme
    if scheme in _PLANNED:
        raise ConfigurationError(
            f"Redis {_PLANNED[scheme]} URLs are not supported yet ({masked_url(url)}); "
            "use redis://, rediss:// or unix://"
        )
    if scheme not in SCHEMES:
        raise ConfigurationError(
            f"Redis URL {masked_url(url)!r} has scheme {scheme!r}; use one of "
            + ", ".join(f"{s}://" for s in SCHEMES)
            + " (set GOVERNOR_REDIS__URL)"
        )
    count = settings.retries if retries is None else retries
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": settings.socket_timeout_seconds,
        "socket_connect_timeout": settings.socket_timeout_seconds,
        "retry": Retry(
            ExponentialBackoff(cap=_BACKOFF_CAP_SECONDS, base=settings.retry_backoff_seconds),
            count,
        ),
        "retry_on_error": [redis.ConnectionError, redis.TimeoutError],
    }
    if settings.username is not None:
        options["username"] = settings.username
    if settings.password is not None:
        options["password"] = settings.password.get_secret_value()
    if scheme == "rediss":
        options["ssl_cert_reqs"] = ssl.CERT_REQUIRED if settings.verify_tls else ssl.CERT_NONE
        if settings.ca_file is not None:
            options["ssl_ca_certs"] = str(settings.ca_file)
    try:
        return redis.Redis.from_url(url, **options)
    except (ValueError, redis.RedisError) as exc:
        raise ConfigurationError(f"Redis URL {masked_url(url)!r}: {exc}") from None


def location(client: redis.Redis[str]) -> str:
    """Where a client points, without credentials, for error messages."""
    kwargs = client.connection_pool.connection_kwargs
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
            hint = (
                "set GOVERNOR_REDIS__CA_FILE to the CA bundle that signed the server's "
                "certificate; GOVERNOR_REDIS__VERIFY_TLS=false only to test"
            )
        raise SinkError(f"Redis at {location(client)}: {action} failed: {exc} ({hint})") from exc
