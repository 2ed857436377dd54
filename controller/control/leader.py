"""Leader election: only one replica writes. A Redis lock with a fencing token out of cluster,
a Kubernetes Lease in cluster; either way the leader's token is kept in Redis so that every
write can check it (a deposed leader's late write is refused)."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis
import structlog
from redis.exceptions import RedisClusterException

from controller.clients.redis import check_contract, key_schema, location, wrapped
from controller.contract.fence import Fence
from controller.errors import SinkError

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Take the lock if it is free: a new epoch (fencing token) for every new holder.
_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local epoch = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. '#' .. epoch
redis.call('SET', KEYS[1], value, 'PX', ARGV[2])
return value
"""


class Elector(Protocol):
    """Decides whether this replica may write."""

    identity: str
    # Why the last `ensure` could not ask for the lock (Redis failed or refused, with the
    # repair when known); None when it could, led or not. A Redis that answers reads but
    # refuses every write (a replica, an ACL without write rights) leaves no replica able to
    # lead while every read succeeds: without this the tick looked healthy.
    problem: str | None

    def ensure(self) -> bool:
        """Acquire or renew leadership; True while this replica is the leader."""
        ...

    def fence(self) -> Fence | None:
        """The token writes must check, or None when not leading."""
        ...

    def release(self) -> None:
        """Step down (on shutdown) so another replica takes over at once."""
        ...


class AlwaysLeader:
    """A single replica that never competes (`--once`, tests, embedded Redis)."""

    def __init__(self, identity: str = "single") -> None:
        self.identity = identity
        self.problem: str | None = None

    def ensure(self) -> bool:
        return True

    def fence(self) -> Fence | None:
        return None

    def release(self) -> None:
        return None


class RedisLeaderLock:
    """`SET NX PX` lock renewed by its holder; each new holder gets a new epoch as its token."""

    def __init__(
        self, client: redis.Redis[str], prefix: str, identity: str, lease_seconds: float
    ) -> None:
        self.client = client
        self.identity = identity
        schema = self.schema = key_schema(client, prefix)
        self.key = schema.leader
        self.epoch_key = schema.leader_epoch
        self.lease_ms = int(lease_seconds * 1000)
        self._token: str | None = None
        self.problem: str | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._log = structlog.get_logger("governor.leader")

    def ensure(self) -> bool:
        self.problem = None
        lost = self._token is not None
        try:
            with wrapped(self.client, "take or renew the leader lock"):
                if self._token is not None and self._renew(
                    keys=[self.key], args=[self._token, self.lease_ms]
                ):
                    return True
                # Another key contract's Redis: no lock (nor epoch) of ours is written
                # there, and not leading, this replica writes nothing else there either.
                check_contract(self.client.get(self.schema.contract), self.schema,
                               location(self.client))  # fmt: skip
                self._token = self._acquire(
                    keys=[self.key, self.epoch_key], args=[self.identity, self.lease_ms]
                )
        except SinkError as exc:
            return self._failed(exc)
        if lost:
            self._log.warning("leader.lost", identity=self.identity)
        if self._token is not None:
            # `fence`, not `token`: a fencing token is no secret, and the log masks *token*.
            self._log.info("leader.acquired", identity=self.identity, fence=self._token)
        return self._token is not None

    def _failed(self, exc: SinkError) -> bool:
        """Not leading this tick. Redis failed or refused (`wrapped`: its cause is the
        client's error): keep the token so a renewal can succeed if the lock survived, and
        say why for readiness. Another contract's Redis: give the lock up."""
        if isinstance(exc.__cause__, (redis.RedisError, RedisClusterException)):
            self.problem = str(exc)
            self._log.warning("leader.redis_unavailable", error=self.problem)
        else:
            self._token = None
            self._log.error("leader.refused", error=str(exc))
        return False

    def fence(self) -> Fence | None:
        return Fence(self.key, self._token) if self._token is not None else None

    def release(self) -> None:
        if self._token is None:
            return
        try:
            self._release(keys=[self.key], args=[self._token])
        except redis.RedisError as exc:
            self._log.warning("leader.release_failed", error=str(exc))
        self._token = None


class KubernetesLease:
    """A coordination.k8s.io/v1 Lease (the client-go leader-election protocol).

    The holder renews `renewTime`; a Lease not renewed for `leaseDurationSeconds` may be taken
    by another replica, which increments `leaseTransitions`. Updates carry the Lease's
    resourceVersion, so two replicas racing for it cannot both win (the API answers 409).
    On winning, the holder also writes `<identity>#<transitions>` to the Redis fence key, so
    Redis writes can check leadership atomically.
    """

    def __init__(
        self,
        api: Any,  # kubernetes.client.CoordinationV1Api
        namespace: str,
        name: str,
        identity: str,
        lease_seconds: float,
        fence_client: redis.Redis[str],
        fence_key: str,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_seconds = int(lease_seconds)
        self.fence_client = fence_client
        self.fence_key = fence_key
        self._clock = clock
        self._token: str | None = None
        self.problem: str | None = None  # Redis' part only: the Lease API has its own logs
        self._log = structlog.get_logger("governor.leader")

    def ensure(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        self.problem = None

        try:
            won = self._try()
        except ApiException as exc:
            if exc.status != 409:
                self._log.warning("leader.lease_error", status=exc.status, reason=exc.reason)
            won = None
        except Exception as exc:  # network errors of the client: no leadership, no crash
            self._log.warning("leader.lease_error", error=str(exc))
            won = None
        if won is None:
            self._token = None
            return False
        try:
            with wrapped(self.fence_client, "write the leader's fence"):
                if won == self._token:
                    self.fence_client.pexpire(self.fence_key, self.lease_seconds * 1000)
                else:
                    self.fence_client.set(self.fence_key, won, px=self.lease_seconds * 1000)
        except SinkError as exc:
            self.problem = str(exc)
            self._log.warning("leader.redis_unavailable", error=self.problem)
            return False
        if won != self._token:
            self._log.info("leader.acquired", identity=self.identity, fence=won)
        self._token = won
        return True

    def _try(self) -> str | None:
        """Create, renew or take over the Lease; the token when we hold it, else None."""
        from kubernetes import client as k8s
        from kubernetes.client.exceptions import ApiException

        now = dt.datetime.fromtimestamp(self._clock(), tz=dt.UTC)
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            body = k8s.V1Lease(
                metadata=k8s.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=k8s.V1LeaseSpec(
                    holder_identity=self.identity,
                    lease_duration_seconds=self.lease_seconds,
                    acquire_time=now,
                    renew_time=now,
                    lease_transitions=0,
                ),
            )
            self.api.create_namespaced_lease(self.namespace, body)
            return f"{self.identity}#0"
        spec = lease.spec
        holder = spec.holder_identity
        renewed = spec.renew_time or spec.acquire_time
        duration = spec.lease_duration_seconds or self.lease_seconds
        expired = renewed is None or (now - renewed).total_seconds() > duration
        transitions = spec.lease_transitions or 0
        if holder != self.identity:
            if not expired and holder:
                return None
            transitions += 1
            spec.acquire_time = now
        spec.holder_identity = self.identity
        spec.renew_time = now
        spec.lease_duration_seconds = self.lease_seconds
        spec.lease_transitions = transitions
        self.api.replace_namespaced_lease(self.name, self.namespace, lease)
        return f"{self.identity}#{transitions}"

    def fence(self) -> Fence | None:
        return Fence(self.fence_key, self._token) if self._token is not None else None

    def release(self) -> None:
        if self._token is None:
            return
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            self.fence_client.delete(self.fence_key)
        except Exception as exc:  # best effort on the way out
            self._log.warning("leader.release_failed", error=str(exc))
        self._token = None
