"""A real Redis Cluster on loopback: `masters` redis-servers with `--cluster-enabled yes`,
each with `replicas` replicas, formed by `redis-cli --cluster create` and stopped by PID."""

from __future__ import annotations

import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
from redis.cluster import ClusterNode, RedisCluster

from tests.support.process import wait_for
from tests.support.redis import RedisServer, free_port

_FORM_TIMEOUT_SECONDS = 30.0
# A node's cluster bus listens on its port + 10000: Redis refuses ports above this.
_HIGHEST_NODE_PORT = 55535


def node_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port <= _HIGHEST_NODE_PORT and _free(port + 10000):
            return port


def _free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


@dataclass
class ClusterNodeServer(RedisServer):
    """One cluster node: a RedisServer started with cluster mode on (its own nodes.conf)."""

    def options(self) -> list[str]:
        auth = ["--masterauth", self.password] if self.password else []
        return [
            "--cluster-enabled", "yes",
            "--cluster-config-file", str(self.directory / "nodes.conf"),
            # A killed master is failed over within a few seconds in the failover test.
            "--cluster-node-timeout", "2000",
            # Replicas sync at once (not after the default 5 s): a replica that never
            # synced refuses to fail over ("disconnected from master for longer than
            # allowed").
            "--repl-diskless-sync-delay", "0",
            *auth,
        ]  # fmt: skip


@dataclass
class RedisClusterServers:
    """`masters` masters and `replicas` replicas each, under `directory`."""

    directory: Path
    masters: int = 3
    replicas: int = 0
    password: str | None = None
    nodes: list[ClusterNodeServer] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The `redis+cluster://` URL Governor takes: every node as a seed."""
        auth = f":{self.password}@" if self.password else ""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes)
        return f"redis+cluster://{auth}{seeds}/0"

    @property
    def first_url(self) -> str:
        """A plain `redis://` URL of one node (what a user points at a cluster by mistake)."""
        return self.nodes[0].url

    def client(self) -> RedisCluster[str]:
        """A cluster client for assertions (decoded strings)."""
        return RedisCluster(
            startup_nodes=[ClusterNode("127.0.0.1", node.port) for node in self.nodes],
            password=self.password,
            decode_responses=True,
        )

    def start(self) -> RedisClusterServers:
        """Start every node, form the cluster and wait until every slot is served."""
        count = self.masters * (1 + self.replicas)
        self.nodes = [
            ClusterNodeServer(self.directory / f"node{i}", port=node_port(), password=self.password)
            for i in range(count)
        ]
        try:
            self._form()
        except BaseException:
            self.stop()  # no daemonized node outlives a failed start
            raise
        return self

    def _form(self) -> None:
        for node in self.nodes:
            node.start()
        args = ["redis-cli", "--cluster", "create"]
        args += [f"127.0.0.1:{node.port}" for node in self.nodes]
        args += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
        if self.password:
            args += ["-a", self.password, "--no-auth-warning"]
        subprocess.run(args, check=True, capture_output=True, timeout=60)
        wait_for(self._formed, self._not_formed, _FORM_TIMEOUT_SECONDS)

    def flush(self) -> None:
        """Empty every master (between tests)."""
        for node in self.nodes:
            with node.client() as client:
                if client.info("replication").get("role") == "master":
                    client.flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def _formed(self) -> bool:
        for node in self.nodes:
            try:
                with node.client() as client:
                    info = client.cluster("info")
            except redis.RedisError:
                return False
            state = info.get("cluster_state") if isinstance(info, dict) else None
            if state != "ok" or not self._synced(node):
                return False
        try:
            with self.client() as cluster:
                return bool(cluster.ping())
        except redis.RedisError:
            return False

    @staticmethod
    def _synced(node: ClusterNodeServer) -> bool:
        """A master, or a replica whose link to its master is up (it has synced)."""
        with node.client() as client:
            replication = client.info("replication")
        return replication.get("role") == "master" or (
            replication.get("master_link_status") == "up"
        )

    def _not_formed(self) -> str:
        logs = [
            f"{node.port}: " + (node.directory / "redis.log").read_text(errors="replace")[-500:]
            for node in self.nodes
        ]
        return "the Redis Cluster did not form:\n" + "\n".join(logs)


def master_of(cluster: RedisClusterServers, key: str) -> ClusterNodeServer:
    """The node that serves `key`'s slot now."""
    with cluster.client() as client:
        node = client.get_node_from_key(key)
    assert node is not None
    return next(n for n in cluster.nodes if n.port == int(node.port))


@contextmanager
def single_and_cluster() -> Iterator[tuple[RedisServer, RedisClusterServers]]:
    """One redis-server and a 3-master cluster in a temporary folder, stopped after (the
    benchmarks compare the two)."""
    with tempfile.TemporaryDirectory() as directory:
        single = RedisServer(Path(directory) / "single").start()
        try:
            cluster = RedisClusterServers(Path(directory) / "cluster", masters=3).start()
            try:
                yield single, cluster
            finally:
                cluster.stop()
        finally:
            single.stop()
