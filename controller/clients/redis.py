"""Redis connections from a URL and settings; Redis errors become SinkError naming the server."""

from __future__ import annotations

import contextlib
import re
import ssl
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.asyncio.sentinel
import redis.cluster
import redis.sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import AskError, MovedError, RedisClusterException
from redis.retry import Retry

from controller.contract.keys import KeySchema
from controller.errors import ConfigurationError, SinkError, untrusted_certificate_hint
from controller.settings import RedisSettings, Settings
from controller.urls import UNENCODED_PASSWORD, cut_password, mask_url

SCHEMES = (
    "redis",
    "rediss",
    "unix",
    "redis+sentinel",
    "rediss+sentinel",
    "redis+cluster",
    "rediss+cluster",
)
_SENTINEL = ("redis+sentinel", "rediss+sentinel")
_CLUSTER = ("redis+cluster", "rediss+cluster")
_BACKOFF_CAP_SECONDS = 2.0
_SENTINEL_PORT = 26379
_REDIS_PORT = 6379
# How often (at most, and only while commands are sent) a client behind Sentinel asks it where
# the master is: the longest a pooled connection keeps writing to an old master after a
# failover, where redis-py alone asks only when it opens a connection.
MASTER_CHECK_SECONDS = 1.0
_SENTINEL_EXAMPLE = "redis+sentinel://:password@sentinel-0:26379,sentinel-1:26379/mymaster/0"
_CLUSTER_EXAMPLE = "redis+cluster://node-0:6379,node-1:6379,node-2:6379/0"
# What a MOVED, ASK or CROSSSLOT error means for a Governor user: a cluster node reached
# through a plain URL, or a key layout that does not fit a cluster.
CLUSTER_HINT = (
    "this Redis is a Cluster node: set GOVERNOR_REDIS__URL to a redis+cluster:// URL listing "
    f"the nodes, e.g. {_CLUSTER_EXAMPLE} (rediss+cluster:// for TLS)"
)
# The other way round: a redis+cluster:// URL naming a server without cluster mode.
NOT_CLUSTER_HINT = (
    "this Redis is not a Cluster node (cluster_enabled:0): set GOVERNOR_REDIS__URL to a "
    "redis:// URL (rediss:// for TLS, redis+sentinel:// behind Sentinel); redis+cluster:// is "
    "for a Redis Cluster only"
)


def masked_url(url: str) -> str:
    """The URL with any password masked (safe for logs and messages): `mask_url`."""
    return mask_url(url)


def url_from_settings(settings: Settings) -> str:
    """The configured Redis URL, or ConfigurationError saying which variable to set."""
    if settings.redis.url is None:
        raise ConfigurationError(
            "no Redis configured: set GOVERNOR_REDIS__URL, e.g. redis://127.0.0.1:6379/0 "
            "(rediss:// for TLS, unix:///path/to/redis.sock for a socket, "
            f"{_SENTINEL_EXAMPLE} for Sentinel, {_CLUSTER_EXAMPLE} for a Cluster)"
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
    bad = _complaint("Sentinel", url, _SENTINEL_EXAMPLE)
    parts = _split(url, bad)
    sentinels, username, password = _host_list(parts.netloc, _SENTINEL_PORT, bad)
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


def _complaint(kind: str, url: str, example: str) -> Callable[[str], ConfigurationError]:
    """What a URL parser raises: the URL (password masked), why, and an example."""

    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(
            f"Redis {kind} URL {masked_url(url)!r}: {why}; expected e.g. {example}"
        )

    return bad


def _split(url: str, bad: Callable[[str], ConfigurationError]) -> SplitResult:
    """`url` in parts, or `bad` when its password ends the host too soon (a piece of the
    password would be named as a host's port)."""
    if cut_password(url):
        raise bad(UNENCODED_PASSWORD)
    return urlsplit(url)


def _host_list(
    netloc: str, default_port: int, bad: Callable[[str], ConfigurationError]
) -> tuple[list[tuple[str, int]], str, str]:
    """`[user:password@]host[:port][,host[:port]...]` → (hosts, user, password), as written."""
    auth, _, hosts = netloc.rpartition("@")
    username, _, password = auth.partition(":") if auth else ("", "", "")
    found = []
    for entry in filter(None, hosts.split(",")):
        host, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if not port.isdigit() and port:
            raise bad(f"port {port!r} of {entry!r} is not a number")
        found.append((host, int(port) if port else default_port))
    return found, username, password


@dataclass(frozen=True)
class ClusterTarget:
    """What a `redis+cluster://` URL names: the nodes to start from (any reachable one
    tells the client the rest), and the data nodes' credentials."""

    nodes: list[tuple[str, int]]
    username: str | None
    password: str | None


def parse_cluster_url(url: str) -> ClusterTarget:
    """`redis+cluster://[user:password@]host[:port][,host[:port]...][/0]`;
    ConfigurationError naming what is wrong."""
    bad = _complaint("Cluster", url, _CLUSTER_EXAMPLE)
    parts = _split(url, bad)
    nodes, username, password = _host_list(parts.netloc, _REDIS_PORT, bad)
    if not nodes:
        raise bad("no node")
    if parts.path.strip("/") not in ("", "0"):
        raise bad(f"a Cluster has database 0 only, not {parts.path.strip('/')!r}")
    if parts.query:
        raise bad("it takes no parameters")
    return ClusterTarget(nodes, unquote(username) or None, unquote(password) or None)


def client_options(url: str, settings: RedisSettings) -> dict[str, Any]:
    """What every Governor client (sync or async) sets: decoded answers, timeouts, the login
    from settings (it wins over the URL's), TLS for rediss://, rediss+sentinel:// and
    rediss+cluster://."""
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
    _join_login(options, url, target.username, target.password)
    own = {k: v for k, v in options.items() if k.startswith(("socket_", "ssl"))}
    if target.sentinel_password is not None:
        own["password"] = target.sentinel_password
    return target, own


def _cluster_setup(url: str, options: dict[str, Any]) -> ClusterTarget:
    """The target; the URL's login joins the options (settings' win), TLS for rediss+."""
    target = parse_cluster_url(url)
    _join_login(options, url, target.username, target.password)
    return target


def _join_login(
    options: dict[str, Any], url: str, username: str | None, password: str | None
) -> None:
    """The URL's login where settings gave none; TLS for the rediss+ schemes."""
    if username is not None:
        options.setdefault("username", username)
    if password is not None:
        options.setdefault("password", password)
    options["ssl"] = urlsplit(url).scheme.startswith("rediss+")


class _MasterCheck:
    """When a client behind Sentinel is due to ask it where the master is again.

    redis-py asks Sentinel only when it opens a connection, and drops one only when the
    server closes it or answers READONLY. After a failover Sentinel names the new master at
    once, but turns the old one (still up, still a master) into a replica, killing its
    clients, only 8 s or more later, and not at all while Sentinel is in TILT mode or cannot
    reach it: until then a pooled connection writes to the old master without an error and
    what it writes is lost (the leader lock, the limits, the gateway's admissions). Asking
    now and then lets redis-py's own `get_master_address` see the change: it closes the idle
    connections, and the pool's `release` the busy ones, so they reconnect to the new one.
    """

    def __init__(self) -> None:
        self._last = -MASTER_CHECK_SECONDS

    def due(self) -> bool:
        # Marked before asking: concurrent callers (the gateway's tasks) ask once between them.
        now = time.monotonic()
        if now - self._last < MASTER_CHECK_SECONDS:
            return False
        self._last = now
        return True


# A Sentinel that does not answer leaves the connections where they are: the master they
# reach may be fine, and opening a connection asks Sentinel (and reports it) anyway.
_UNANSWERED = (redis.ConnectionError, redis.TimeoutError)


class _FollowingPool(redis.sentinel.SentinelConnectionPool):
    """A master's pool that follows a failover within MASTER_CHECK_SECONDS (`_MasterCheck`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check = _MasterCheck()

    def get_connection(self, *args: Any, **kwargs: Any) -> redis.connection.Connection:
        if self._check.due():
            with contextlib.suppress(*_UNANSWERED):
                self.get_master_address()
        return super().get_connection(*args, **kwargs)


class _AsyncFollowingPool(redis.asyncio.sentinel.SentinelConnectionPool):  # type: ignore[type-arg]
    """`_FollowingPool` for the gateway: its admissions send on a connection of the pool
    (`Script.run`), so they follow the master too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._check = _MasterCheck()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._check.due():
            with contextlib.suppress(*_UNANSWERED):
                await self.get_master_address()
        return await super().get_connection(*args, **kwargs)


def write_backoff(settings: RedisSettings) -> ExponentialBackoff:
    """The wait before each retry of a failed write: redis-py waits `retry_backoff_seconds`
    × 2^(failures so far), at most _BACKOFF_CAP_SECONDS (0.1, 0.2, 0.4 s by default)."""
    return ExponentialBackoff(cap=_BACKOFF_CAP_SECONDS, base=settings.retry_backoff_seconds)


def write_retry_async(
    settings: RedisSettings, errors: tuple[type[Exception], ...]
) -> redis.asyncio.retry.Retry:
    """`connect`'s retry policy (`settings.retries` more tries, `write_backoff` between
    them) for an async write that its caller repeats with `call_with_retry`: the gateway's
    client retries nothing by itself (`connect_async`: a repeated admission could reserve
    twice), so only a write that is the same when repeated (a SET) asks for this.

    `errors`: what a try may raise to be tried again, Governor's wrappings of Redis errors
    included (redis-py catches whatever types it is given; its stubs say RedisError only)."""
    return redis.asyncio.retry.Retry(
        write_backoff(settings),
        settings.retries,
        supported_errors=cast("tuple[type[redis.RedisError], ...]", errors),
    )


def connect(url: str, settings: RedisSettings, *, retries: int | None = None) -> redis.Redis[str]:
    """A client for `url` (redis://, rediss://, unix://, redis+sentinel://,
    redis+cluster://); `retries` overrides settings.retries.

    Retries cover connection errors and timeouts only, with exponential backoff; MULTI/EXEC
    makes a retried transaction all-or-nothing. Behind Sentinel a failover is such an error
    for a moment: the retry asks the Sentinels for the new master; an old master that stays
    up is left within MASTER_CHECK_SECONDS (`_MasterCheck`).
    """
    scheme = _check_scheme(url)
    count = settings.retries if retries is None else retries
    options = client_options(url, settings)
    options["retry"] = Retry(write_backoff(settings), count)
    options["retry_on_error"] = [redis.ConnectionError, redis.TimeoutError]
    try:
        if scheme in _SENTINEL:
            target, own = _sentinel_setup(url, options)
            manager = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=own, **options)
            return manager.master_for(
                target.service, connection_pool_class=_FollowingPool, db=target.db
            )
        if scheme in _CLUSTER:
            return _connect_cluster(url, options)
        return redis.Redis.from_url(url, **options)
    except (ValueError, redis.RedisError) as exc:
        raise ConfigurationError(f"Redis URL {masked_url(url)!r}: {exc}") from None


def _connect_cluster(url: str, options: dict[str, Any]) -> redis.Redis[str]:
    """A cluster client; it asks the nodes for the slot map at once, so an unreachable
    cluster is a SinkError here (redis-py's sync cluster client has no lazy start)."""
    target = _cluster_setup(url, options)
    nodes = [redis.cluster.ClusterNode(host, port) for host, port in target.nodes]
    options.pop("retry_on_error", None)  # the cluster client retries those itself
    try:
        client: redis.cluster.RedisCluster[str] = redis.cluster.RedisCluster(
            startup_nodes=nodes, **options
        )
    except (RedisClusterException, redis.ConnectionError, redis.TimeoutError) as exc:
        refuse_plain_nodes(target.nodes, options)  # a node that is no Cluster node: exit 2
        raise SinkError(
            f"Redis Cluster {masked_url(url)}: no node answered ({exc}); are the nodes up "
            "and GOVERNOR_REDIS__URL right?"
        ) from None
    # It answers the same commands (RedisClusterCommands); what differs — scripts and
    # transactions must keep to one slot — callers ask `is_cluster` for.
    return cast("redis.Redis[str]", client)


def is_cluster(client: object) -> bool:
    """Whether `client` is a Redis Cluster client (sync or async)."""
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def key_schema(client: object, prefix: str) -> KeySchema:
    """The contract's key names for this client: contract 2 (sharded) on a Redis Cluster,
    contract 1 on one Redis (its names, scripts and costs unchanged)."""
    return KeySchema(prefix, sharded=is_cluster(client))


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
            return manager.master_for(
                target.service, connection_pool_class=_AsyncFollowingPool, db=target.db
            )
        if scheme in _CLUSTER:
            return _connect_cluster_async(url, options)
        return redis.asyncio.Redis.from_url(url, **options)
    except (ValueError, redis.RedisError, RedisClusterException) as exc:
        raise ConfigurationError(f"Redis URL {masked_url(url)!r}: {exc}") from None


def _connect_cluster_async(url: str, options: dict[str, Any]) -> redis.asyncio.Redis[str]:
    """Lazy: the slot map is read on the first command, so a gateway starts while the
    cluster is away and serves the plans' fail modes meanwhile. No retries, as above."""
    target = _cluster_setup(url, options)
    nodes = [redis.asyncio.cluster.ClusterNode(host, port) for host, port in target.nodes]
    cluster: redis.asyncio.cluster.RedisCluster[str] = redis.asyncio.cluster.RedisCluster(
        startup_nodes=nodes, **options
    )
    return cast("redis.asyncio.Redis[str]", cluster)


def close(client: redis.Redis[str]) -> None:
    """Close a client and, behind Sentinel, its connections to the Sentinels."""
    client.close()
    if is_cluster(client):
        return
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        pool.disconnect()
        for sentinel in pool.sentinel_manager.sentinels:
            sentinel.close()
            sentinel.connection_pool.disconnect()


async def aclose(client: redis.asyncio.Redis[str]) -> None:
    """Close an async client and, behind Sentinel, its connections to the Sentinels."""
    await client.aclose()  # type: ignore[attr-defined]  # types-redis predates aclose
    if is_cluster(client):
        return
    pool = client.connection_pool
    if isinstance(pool, redis.asyncio.sentinel.SentinelConnectionPool):
        for sentinel in pool.sentinel_manager.sentinels:
            await sentinel.aclose()  # type: ignore[attr-defined]


def location(client: redis.Redis[str]) -> str:
    """Where a client points, without credentials, for error messages."""
    if is_cluster(client):
        nodes = cast("redis.cluster.RedisCluster[str]", client).get_primaries()
        return "cluster " + ",".join(sorted(f"{n.host}:{n.port}" for n in nodes))
    pool = client.connection_pool
    if isinstance(pool, redis.sentinel.SentinelConnectionPool):
        service = f"the master of Sentinel service {pool.service_name!r}"
        # The stubs predate redis-py's `master_address` (None until Sentinel was asked).
        named: tuple[str, int] | None = getattr(pool, "master_address", None)
        return service if named is None else f"{service} (last named {named[0]}:{named[1]})"
    kwargs = pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}"
    return f"{kwargs.get('host', '?')}:{kwargs.get('port', '?')}/{kwargs.get('db', 0)}"


def evicting(client: redis.Redis[str]) -> str | None:
    """Why this Redis may drop Governor's keys by itself: a `maxmemory` with a policy that
    evicts (allkeys-*, volatile-*) removes limits, API keys, credits or the version without
    an error once it is full; None when it evicts nothing, or cannot tell (INFO refused)."""
    try:
        if is_cluster(client):  # every node ({node: info}): any may hold a slot, or be promoted
            cluster = cast("redis.cluster.RedisCluster[str]", client)
            answers: list[tuple[str, Any]] = list(
                cluster.info("memory", target_nodes=cluster.ALL_NODES).items()
            )
        else:
            answers = [(location(client), client.info("memory"))]
    except (redis.RedisError, RedisClusterException):
        return None
    for where, info in answers:
        policy = str(info.get("maxmemory_policy", "noeviction"))
        if int(info.get("maxmemory", 0) or 0) > 0 and policy != "noeviction":
            return (
                f"Redis at {where} evicts keys once full (maxmemory-policy {policy}): "
                "Governor's limits, API keys and credits can vanish without an error; set "
                "maxmemory-policy noeviction (a full Redis then refuses writes, which Governor "
                "reports and tries again)"
            )
    return None


def refuse_cluster_node(client: redis.Redis[str]) -> None:
    """ConfigurationError when a plain URL (redis://, rediss://, unix://, Sentinel) names a
    Cluster node: `INFO cluster` says `cluster_enabled:1`. Commands on one would half work
    (a key of another slot answers MOVED), so nothing starts. A server that does not answer,
    or refuses INFO (an ACL), is left to the first real command to report."""
    if is_cluster(client):
        return
    try:
        info = client.info("cluster")
    except redis.RedisError:
        return
    if str(info.get("cluster_enabled", "0")) == "1":
        raise ConfigurationError(f"Redis at {location(client)}: {CLUSTER_HINT}")


def check_contract(found: str | None, keys: KeySchema, where: str) -> None:
    """SinkError when `found` (what `<P>:contract` holds) is another key contract than the
    one `keys` lays out: its keys mean something else there, so nothing may be read as
    limits or written over them (each apply would also stamp our number over theirs)."""
    speaks = keys.contract_version
    if found is not None and found != str(speaks):
        raise SinkError(
            f"Redis at {where} holds key contract {found[:40]!r} in {keys.contract}, this "
            f"Governor speaks {speaks}: nothing is read or written there; use another "
            "GOVERNOR_REDIS__KEY_PREFIX, or migrate (docs/redis-contract.md)"
        )


def refuse_other_contract(client: redis.Redis[str], keys: KeySchema, action: str) -> None:
    """`check_contract` on what Redis holds now (one GET), before `action`."""
    with wrapped(client, action):
        found: str | None = client.get(keys.contract)
    check_contract(found, keys, location(client))


def refuse_plain_nodes(nodes: list[tuple[str, int]], options: Mapping[str, Any]) -> None:
    """ConfigurationError when a node of a redis+cluster:// URL answers `INFO cluster` with
    `cluster_enabled:0`: every command would fail (redis-py reads no slot map from it), which
    the gateway would serve as an outage in each plan's fail mode. A node that does not
    answer, or refuses INFO, is left to the cluster client to report."""
    plain = {k: v for k, v in options.items() if k != "retry"}
    for host, port in nodes:
        probe: redis.Redis[str] = redis.Redis(host=host, port=port, **plain)
        try:
            info = probe.info("cluster")
        except redis.RedisError:
            continue
        finally:
            probe.close()
        if str(info.get("cluster_enabled", "1")) == "0":
            raise ConfigurationError(f"Redis at {host}:{port}: {NOT_CLUSTER_HINT}")


def refuse_cluster_url(url: str, settings: RedisSettings) -> None:
    """`refuse_cluster_node` on a client of its own without retries (a Redis that is down
    is not waited for here; its first real command reports it); for a redis+cluster:// URL,
    `refuse_plain_nodes`."""
    if urlsplit(url).scheme in _CLUSTER:
        options = client_options(url, settings)
        refuse_plain_nodes(_cluster_setup(url, options).nodes, options)
        return
    probe = connect(url, settings, retries=0)
    try:
        refuse_cluster_node(probe)
    finally:
        close(probe)


def response_hint(exc: redis.ResponseError, clustered: bool) -> str:
    """What to do about a Redis error reply, if we know; '' otherwise."""
    text = str(exc)
    if isinstance(exc, AskError):  # MOVED or ASK: a slot served elsewhere
        kind = "MOVED" if isinstance(exc, MovedError) else "ASK"
        return f" ({kind}: the key's slot is served by another node; {CLUSTER_HINT})"
    if "CROSSSLOT" in text or "hash to the same slot" in text:  # redis-py drops the keyword
        return " (CROSSSLOT: " + (LAYOUT_HINT if clustered else CLUSTER_HINT) + ")"
    if "WRONGTYPE" in text:
        return (
            " (a key Governor owns was replaced by hand with another type: "
            "delete it and Governor rewrites it on the next tick)"
        )
    code = reply_code(exc)
    if code == "READONLY" or isinstance(exc, redis.ReadOnlyError):
        return (
            " (this Redis is a read-only replica: point GOVERNOR_REDIS__URL at the master, "
            "or at its Sentinels with redis+sentinel://, which follow failovers)"
        )
    if code == "NOPERM":
        return (
            " (an ACL refused this command or key: Governor's Redis user needs its commands "
            "on every key and channel of GOVERNOR_REDIS__KEY_PREFIX, e.g. ACL SETUSER <user> "
            "~<prefix>:* &<prefix>:* +@all; GOVERNOR_REDIS__USERNAME names the user)"
        )
    if code == "OOM":
        return (
            " (this Redis is full: maxmemory is reached and its policy evicts nothing; "
            "raise maxmemory or free memory, as Governor's keys must not be evicted)"
        )
    return ""


# An ACL refusal inside a script is no NOPERM reply: Redis answers `ERR The user executing the
# script can't run this command…`, which names no code a caller could tell apart.
_SCRIPT_NOPERM = "The user executing the script can't run"


def reply_code(exc: redis.ResponseError) -> str:
    """The error code of a reply (`OOM`, `READONLY`, `NOPERM`, `ERR`…). redis-py strips the
    code off the replies it knows and keeps it apart (status_code): the message alone no
    longer names it."""
    if _SCRIPT_NOPERM in str(exc):
        return "NOPERM"
    code: str | None = getattr(exc, "status_code", None)
    return code or str(exc).split(" ", 1)[0]


def hint_for(exc: BaseException) -> str:
    """`response_hint` of the Redis reply behind one of our own errors, if any; '' otherwise
    (or when the error's own message gives the repair already)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SinkError) and seen.hinted:
            return ""
        if isinstance(seen, redis.ResponseError):
            return response_hint(seen, clustered=False)
        seen = seen.__cause__ or seen.__context__
    return ""


# Error replies that say the server (or the cluster) cannot serve anyone right now, not that
# it refused this one call: an outage in all but name.
_WHOLE_SERVER_REPLIES = ("OOM", "MASTERDOWN", "NOREPLICAS", "BUSY", "LOADING", "TRYAGAIN",
                         "CLUSTERDOWN", "READONLY", "NOAUTH", "NOPERM")  # fmt: skip


_WHOLE_SERVER = (redis.ReadOnlyError, redis.exceptions.NoPermissionError,
                 redis.exceptions.MasterDownError, redis.exceptions.TryAgainError,
                 redis.exceptions.ClusterDownError)  # fmt: skip


def refused_this_call(exc: BaseException) -> bool:
    """Whether a failed call reached a Redis that answered and refused this call alone (a key
    of the wrong type, a script error on one tenant's record), seen through our own wrapping:
    repeating other calls then goes on, where an outage stops them all."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, redis.ResponseError):
            code = reply_code(seen)
            return code not in _WHOLE_SERVER_REPLIES and not isinstance(seen, _WHOLE_SERVER)
        seen = seen.__cause__
    return False


def unanswered(exc: BaseException) -> bool:
    """Whether a failed call, seen through our own wrapping, met a timeout or a cut connection:
    when it had been sent, the server may have run it all the same (a stall, then the answer
    to a connection already given up)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, _UNANSWERED):
            return True
        seen = seen.__cause__
    return False


# redis-py names each Sentinel it asked by its client's repr, some 900 characters of pool
# settings per Sentinel ("No master found for 'm' : <redis.client.Redis(<...>)> - error"):
# shown as the Sentinel's address, what the reader needs to tell which one failed.
_CLIENT_REPR = re.compile(
    r"<redis\.(?:asyncio\.)?client\.Redis\(.*?[(,]host=(?P<host>[^,]*),port=(?P<port>\d+).*?\)>\)>\)>"
)


def said(exc: BaseException) -> str:
    """`str(exc)`, each Redis client's repr in it replaced by `Sentinel host:port`."""
    text = str(exc)
    if "<redis." not in text:
        return text
    return _CLIENT_REPR.sub(lambda m: f"Sentinel {m['host']}:{m['port']}", text)


def explained(exc: Exception, clustered: bool) -> str:
    """An error of a Redis client (a reply, or a refusal of the cluster client itself) with
    what to do about it, when we know."""
    if isinstance(exc, RedisClusterException):
        return f"{exc} ({cluster_client_hint(exc)})"
    if isinstance(exc, redis.ResponseError):
        return f"{exc}{response_hint(exc, clustered)}"
    return said(exc) + connection_hint(exc)


_UNVERIFIED = "CERTIFICATE_VERIFY_FAILED"
# What Redis says to a client whose login it refused (redis-py raises AuthenticationError; a
# wrapping of ours keeps only the words): no password where one is asked (NOAUTH, or HELLO's
# own wording), a wrong one, or a user that is unknown or disabled.
_REFUSED_LOGIN = ("NOAUTH", "WRONGPASS", "invalid username-password pair",
                  "must be called with the client already authenticated")  # fmt: skip
LOGIN_HINT = (
    "Redis refused the login: set the password it expects in GOVERNOR_REDIS__PASSWORD or the "
    "URL, and GOVERNOR_REDIS__USERNAME for an ACL user; credentials are read at start-up, so "
    "restart after a rotation"
)


# redis-py's cluster client gives up after 16 redirections of one call ("TTL exhausted."):
# the slot kept moving (MOVED), was half migrated (ASK, TRYAGAIN for a script whose keys are
# split between the two nodes) or its master was failing over. Not a server that is down.
REDIRECTED = "TTL exhausted"
REDIRECTED_HINT = (
    "the Cluster kept redirecting this call: its slot is being resharded (MOVED, ASK, "
    "TRYAGAIN while its keys are split between two nodes) or its master is failing over; "
    "tried again next time, and `redis-cli --cluster check <node>` shows a slot left open"
)


def connection_repair(exc: BaseException) -> str | None:
    """What repairs, or explains, a call Redis refused or the client gave up for a reason we
    can name (a certificate that did not verify, a login it refused, a Cluster slot that
    kept moving); None for any other error."""
    text = str(exc)
    if _UNVERIFIED in text:
        return untrusted_certificate_hint("REDIS", "the server's")
    if isinstance(exc, redis.AuthenticationError) or any(w in text for w in _REFUSED_LOGIN):
        return LOGIN_HINT
    if REDIRECTED in text:
        return REDIRECTED_HINT
    return None


def connection_hint(exc: BaseException) -> str:
    """` (<connection_repair>)`, unless the message gives it already; '' when there is none.
    The controller's errors said the certificate's repair (`wrapped`); the gateway's logged
    only OpenSSL's or Redis' words, though the settings are the same."""
    repair = connection_repair(exc)
    if repair is None or repair in str(exc):
        return ""
    return f" ({repair})"


# A command or transaction over several slots on a cluster client: contract 2 keeps the
# keys used together in one slot, so this is a call that does not fit it yet.
LAYOUT_HINT = (
    "its keys are in different Cluster slots: this call does not fit key contract 2 yet "
    "(docs/redis-contract.md, Redis Cluster, lists what works on a Cluster)"
)


def cluster_client_hint(exc: RedisClusterException) -> str:
    """What a refusal of redis-py's cluster client itself (not a reply) means."""
    return "are the Cluster's nodes up?" if "connect" in str(exc) else LAYOUT_HINT


@dataclass(frozen=True, slots=True)
class Owned:
    """What a key Governor owns holds (its type as Redis' TYPE says it), and how a person
    repairs it when it holds something else."""

    type: str
    fix: str


def not_governors(where: str, text: str, why: str, fix: str) -> str:
    """The one wording for a value at `where` that Governor never wrote (a record, a counter
    a person edited by hand): what it holds, why it is refused and its repair."""
    return f"{where} holds {text[:80]!r}, not a record Governor writes ({why}): {fix}"


def is_wrong_type(exc: redis.ResponseError) -> bool:
    return "WRONGTYPE" in str(exc)


def wrong_types(client: redis.Redis[str], owned: Mapping[str, Owned]) -> str:
    """Each key of `owned` that holds another type, with its repair; '' when none does (or
    Redis cannot tell)."""
    found = []
    for key, want in owned.items():
        try:
            held = str(client.type(key))  # type: ignore[no-untyped-call]
        except redis.RedisError:
            return ""
        if held not in ("none", want.type):
            found.append(f"{key} is a {held}, not the {want.type} Governor keeps there: {want.fix}")
    return "; ".join(found)


@contextmanager
def wrapped(
    client: redis.Redis[str],
    action: str,
    owned: Callable[[], Mapping[str, Owned]] | None = None,
) -> Iterator[None]:
    """Turn any Redis client error inside the block into a SinkError naming server and action.
    `owned()` gives the keys the block uses and their types: a WRONGTYPE error names the key
    replaced by hand and its repair instead of a generic hint."""
    try:
        yield
    except redis.ResponseError as exc:
        hint = response_hint(exc, is_cluster(client))
        named = wrong_types(client, owned()) if owned and is_wrong_type(exc) else ""
        hint = f" ({named})" if named else hint
        error = SinkError(f"Redis at {location(client)}: {action} failed: {exc}{hint}")
        error.hinted = True
        raise error from exc
    except redis.RedisError as exc:
        hint = connection_repair(exc) or "is the server up and GOVERNOR_REDIS__URL right?"
        raise SinkError(
            f"Redis at {location(client)}: {action} failed: {said(exc)} ({hint})"
        ) from exc
    except RedisClusterException as exc:  # raised by the cluster client itself, not a reply
        hint = cluster_client_hint(exc)
        raise SinkError(f"Redis at {location(client)}: {action} failed: {exc} ({hint})") from exc
