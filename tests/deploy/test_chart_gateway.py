"""The chart's optional reference gateway: off by default; when on, its objects select only its
own pods, it is hardened like the controller, every variable it gets is a real setting, its
credentials come from Secrets — and a gateway pod and a controller pod started exactly as the
chart says enforce the bundled free plan end to end (real Redis, real Prometheus, a local
model server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from helm_python.errors import HelmRenderError

from controller.contract.keys import KeySchema
from controller.settings import Settings
from tests.deploy.chart import (
    Manifest,
    component,
    container,
    env,
    manifests,
    of_kind,
    one,
    pod_environment,
    render,
    rendered_scenario,
    setting_of,
)
from tests.gateway.fake_upstream import FakeUpstream, ServerThread
from tests.support.prometheus import PrometheusServer, wait_for
from tests.support.redis import RedisServer, free_port

GATEWAY = "gateway"
SCENARIO = "gateway-values.yaml"
STARTUP_SECONDS = 60.0


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return selector.items() <= labels.items()


def pod_labels(docs: tuple[Manifest, ...] | list[Manifest], part: str) -> dict[str, str]:
    labels: dict[str, str] = one(docs, "Deployment", part)["spec"]["template"]["metadata"]["labels"]
    return labels


def test_no_gateway_unless_asked() -> None:
    docs = rendered_scenario("default")[1]
    assert [d["metadata"]["name"] for d in docs if component(d) == GATEWAY] == []
    assert "GOVERNOR_GATEWAY__API_KEY_SECRET" not in env(docs)


def test_the_gateway_objects_select_only_the_gateway_pods() -> None:
    docs = rendered_scenario(SCENARIO)[1]
    gateway, controller = pod_labels(docs, GATEWAY), pod_labels(docs, "controller")
    service = one(docs, "Service", GATEWAY)
    assert selects(service["spec"]["selector"], gateway)
    assert not selects(service["spec"]["selector"], controller)
    # ... and the controller's objects never catch a gateway pod.
    assert not selects(one(docs, "Service")["spec"]["selector"], gateway)
    assert not selects(one(docs, "ServiceMonitor")["spec"]["selector"]["matchLabels"], gateway)
    budget = one(docs, "PodDisruptionBudget", GATEWAY)
    assert selects(budget["spec"]["selector"]["matchLabels"], gateway)
    assert budget["spec"]["minAvailable"] == 2
    monitor = one(docs, "ServiceMonitor", GATEWAY)
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    deployment = one(docs, "Deployment", GATEWAY)
    assert selects(deployment["spec"]["selector"]["matchLabels"], gateway)
    # Autoscaled: the HPA owns the replica count (a fixed one would fight it on every apply).
    assert "replicas" not in deployment["spec"]
    scaler = one(docs, "HorizontalPodAutoscaler", GATEWAY)["spec"]
    assert scaler["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (scaler["minReplicas"], scaler["maxReplicas"]) == (3, 12)


def test_the_gateway_pod_is_hardened_and_probed_on_its_port() -> None:
    docs = rendered_scenario(SCENARIO)[1]
    pod = one(docs, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    main = container(docs, GATEWAY)
    assert pod["automountServiceAccountToken"] is False  # it never calls the Kubernetes API
    assert pod["securityContext"]["runAsNonRoot"] is True
    ctx = main["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    port = {p["name"]: p["containerPort"] for p in main["ports"]}["http"]
    assert str(port) == env(docs, GATEWAY)["GOVERNOR_GATEWAY__PORT"]["value"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert main["command"] == ["governor"]
    assert main["args"] == ["gateway", "--upstream", "http://vllm.models.svc:8000"]


def test_every_gateway_variable_names_a_setting_and_parses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    docs = rendered_scenario(SCENARIO)[1]
    for name, item in env(docs, GATEWAY).items():
        if not name.startswith("GOVERNOR_"):
            continue
        assert setting_of(name) is not None, f"{name} sets no field of controller.settings"
        value = item.get("value")
        if value is None and "secretKeyRef" in item.get("valueFrom", {}):
            value = "redis://redis:6379/0" if name == "GOVERNOR_REDIS__URL" else "s3cret"
        elif value is None:
            value = "governor-gateway-0"
        monkeypatch.setenv(name, value)
    settings = Settings()
    gateway = settings.gateway
    assert (gateway.host, gateway.port) == ("0.0.0.0", 8080)
    assert gateway.gateway_id == "governor-gateway-0"  # the pod's name: the live-gateway count
    assert gateway.jwt_jwks_url == "https://idp.example.com/.well-known/jwks.json"
    assert (gateway.jwt_issuer, gateway.jwt_audience) == (
        "https://idp.example.com/",
        "inference-api",
    )
    assert gateway.jwt_algorithms == ["RS256", "ES256"]
    assert (gateway.user_claim, gateway.trust_forwarded_for) == ("email", True)
    assert settings.prices.models["llama-3-70b"].prompt_per_1k == pytest.approx(0.0006)


def test_gateway_credentials_come_from_secrets_and_reach_the_key_cli() -> None:
    own = manifests(
        render(
            {
                "gateway": {
                    "enabled": True,
                    "upstream": "http://vllm:8000",
                    "apiKeySecret": "k3y-s3cret",
                    "upstreamApiKey": "up-t0ken",
                }
            }
        )
    )
    secret = one(own, "Secret")
    gateway_env, controller_env = env(own, GATEWAY), env(own, "controller")
    for name, key in (
        ("GOVERNOR_GATEWAY__API_KEY_SECRET", "gateway-api-key-secret"),
        ("GOVERNOR_GATEWAY__UPSTREAM_API_KEY", "gateway-upstream-api-key"),
    ):
        ref = gateway_env[name]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": key}
        assert key in secret["data"]
    # `kubectl exec deploy/governor -- governor keys create` must hash keys as gateways do.
    assert (
        controller_env["GOVERNOR_GATEWAY__API_KEY_SECRET"]
        == (gateway_env["GOVERNOR_GATEWAY__API_KEY_SECRET"])
    )
    assert "GOVERNOR_GATEWAY__UPSTREAM_API_KEY" not in controller_env
    assert "k3y-s3cret" not in str(own)
    assert "up-t0ken" not in str(own)

    managed = rendered_scenario(SCENARIO)[1]
    ref = env(managed, GATEWAY)["GOVERNOR_GATEWAY__API_KEY_SECRET"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "governor-gateway", "key": "gateway-api-key-secret", "optional": True}


@pytest.mark.parametrize(
    ("gateway", "message"),
    [
        ({"enabled": True}, "gateway.upstream is required"),
        (
            {"enabled": True, "upstream": "http://m:8000", "jwt": {"jwksUrl": "https://i/jwks"}},
            "issuer and gateway.jwt.audience are required",
        ),
        (
            {"enabled": True, "upstream": "http://m:8000", "autoscaling": {"enabled": True}},
            "needs gateway.resources.requests.cpu",
        ),
    ],
)
def test_an_incomplete_gateway_refuses_to_render(gateway: dict[str, Any], message: str) -> None:
    with pytest.raises(HelmRenderError, match=message):
        render({"gateway": gateway})


# --- a controller pod and a gateway pod, as the chart starts them --------------------------


def _start(command: list[str], environment: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, env=environment, stdout=out, stderr=subprocess.STDOUT)


def _answers(url: str, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise RuntimeError(f"{url}: the process exited:\n{log.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status) == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture
def release(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """The chart's controller (1 replica, 1 s ticks) and gateway started as its Deployments
    say, against a real Redis and Prometheus and a local model server."""
    values = {
        "replicaCount": 1,
        "leaderElection": {"enabled": False},
        "controller": {"tickSeconds": 1},
        "gateway": {
            "enabled": True,
            "replicaCount": 1,
            "upstream": "http://vllm.models:8000",
            "apiKeySecret": "chart-s3cret",
        },
    }
    docs = manifests(render(values))
    policies = tmp_path / "policies"
    policies.mkdir()
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    for name, text in config_map["data"].items():
        (policies / name).write_text(text)
    redis_server = RedisServer(tmp_path / "redis").start()
    prometheus = PrometheusServer(tmp_path / "prometheus").start()
    model = ServerThread(FakeUpstream().app()).start()
    telemetry, gateway_port = free_port(), free_port()
    secrets = {
        "GOVERNOR_REDIS__URL": redis_server.url,
        "GOVERNOR_GATEWAY__API_KEY_SECRET": "chart-s3cret",
    }
    controller_env = pod_environment(
        docs,
        "governor-0",
        {
            **secrets,
            "GOVERNOR_PROMETHEUS__URL": prometheus.url,
            "GOVERNOR_TELEMETRY__PORT": str(telemetry),
            "GOVERNOR_CONTROLLER__POLICY_DIR": str(policies),
        },
    )
    gateway_env = pod_environment(
        docs,
        "governor-gateway-0",
        {**secrets, "GOVERNOR_GATEWAY__PORT": str(gateway_port)},
        GATEWAY,
    )
    main, gateway = container(docs), container(docs, GATEWAY)
    args = [model.url if a == "http://vllm.models:8000" else a for a in gateway["args"]]
    processes: list[subprocess.Popen[bytes]] = []
    try:
        controller_log, gateway_log = tmp_path / "controller.log", tmp_path / "gateway.log"
        processes.append(_start([*main["command"], *main["args"]], controller_env, controller_log))
        ready = f"http://127.0.0.1:{telemetry}/readyz"
        wait_for(
            lambda: _answers(ready, processes[0], controller_log),
            "controller ready",
            STARTUP_SECONDS,
        )
        processes.append(_start([*gateway["command"], *args], gateway_env, gateway_log))
        health = f"http://127.0.0.1:{gateway_port}/healthz"
        wait_for(
            lambda: _answers(health, processes[1], gateway_log), "gateway healthy", STARTUP_SECONDS
        )
        yield {
            "processes": processes,
            "controller": main,
            "controller_env": controller_env,
            "gateway_url": f"http://127.0.0.1:{gateway_port}",
            "redis_url": redis_server.url,
        }
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
            process.wait(timeout=STARTUP_SECONDS)
        model.stop()
        prometheus.stop()
        redis_server.stop()


def test_the_charts_gateway_enforces_what_the_charts_controller_wrote(
    release: dict[str, Any],
) -> None:
    # A key made in the controller's pod (`kubectl exec deploy/governor -- governor keys ...`).
    main = release["controller"]
    made = subprocess.run(
        [*main["command"], "keys", "create", "--tenant", "acme", "--plan", "free", "--json"],
        env=release["controller_env"],
        capture_output=True,
        text=True,
        check=True,
    )
    key = json.loads(made.stdout)["key"]
    # What the controller wrote for the free plan (the bundled policies may have cut it,
    # e.g. business hours halve it), read as on-call would.
    written = subprocess.run(
        [*main["command"], "limits", "get", "plan/free/requests_per_minute", "--json"],
        env=release["controller_env"],
        capture_output=True,
        text=True,
        check=True,
    )
    limit = int(json.loads(written.stdout)["limits"]["plan/free/requests_per_minute"])
    assert limit >= 1
    url = release["gateway_url"]
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    with httpx.Client(base_url=url, headers={"authorization": f"Bearer {key}"}) as client:
        forbidden = client.post("/v1/chat/completions", json={**body, "model": "gpt-4"})
        codes = [
            client.post("/v1/chat/completions", json={**body, "model": "gpt-3.5-turbo"})
            for _ in range(limit + 1)
        ]
        metrics = client.get("/metrics").text
    assert forbidden.status_code == 403  # the free plan's models, from the controller's catalog
    assert [c.status_code for c in codes] == [200] * limit + [429]
    assert "retry-after" in codes[-1].headers
    assert 'outcome="rate_limited",plan="free",tenant="acme"} 1.0' in metrics
    # SIGTERM, as the kubelet stops a pod: the controller exits 0; the gateway finishes, takes
    # itself out of the live-gateway count (fail-open shares grow at once), then re-raises
    # the signal as uvicorn does (exit status 143 in Kubernetes).
    live = KeySchema().gateways
    with redis.Redis.from_url(release["redis_url"], decode_responses=True) as db:
        assert db.zscore(live, "governor-gateway-0") is not None
        controller, gateway = release["processes"]
        os.kill(gateway.pid, signal.SIGTERM)
        assert gateway.wait(timeout=STARTUP_SECONDS) in (0, -signal.SIGTERM)
        assert db.zscore(live, "governor-gateway-0") is None
    os.kill(controller.pid, signal.SIGTERM)
    assert controller.wait(timeout=STARTUP_SECONDS) == 0


def test_a_controller_without_the_gateway_has_no_gateway_objects_at_all() -> None:
    docs = manifests(render({"gateway": {"enabled": False, "upstream": "http://m:8000"}}))
    for kind in ("Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget",
                 "HorizontalPodAutoscaler"):  # fmt: skip
        assert of_kind(docs, kind, GATEWAY) == []


@pytest.mark.parametrize(
    ("gateway", "ref"),
    [
        ({"metricsToken": "scr4pe-t0ken"}, {"name": "governor", "key": "gateway-metrics-token"}),
        (
            {"existingSecret": "mine", "existingSecretMetricsTokenKey": "scrape"},
            {"name": "mine", "key": "scrape"},
        ),
    ],
    ids=["chart's Secret", "existingSecret"],
)
def test_a_metrics_token_reaches_the_gateway_and_its_service_monitor_from_one_secret(
    gateway: dict[str, str], ref: dict[str, str]
) -> None:
    values = {"gateway": {"enabled": True, "upstream": "http://vllm:8000", **gateway}}
    own = manifests(render({**values, "serviceMonitor": {"enabled": True}}))

    assert env(own, GATEWAY)["GOVERNOR_GATEWAY__METRICS_TOKEN"]["valueFrom"] == {
        "secretKeyRef": ref
    }
    [endpoint] = one(own, "ServiceMonitor", GATEWAY)["spec"]["endpoints"]
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": ref}
    assert "scr4pe-t0ken" not in str(own)
    if "metricsToken" in gateway:
        assert "gateway-metrics-token" in one(own, "Secret")["data"]


def test_without_a_metrics_token_the_gateway_metrics_stay_open_as_before() -> None:
    values = {"gateway": {"enabled": True, "upstream": "http://vllm:8000"}}
    own = manifests(render({**values, "serviceMonitor": {"enabled": True}}))
    assert "GOVERNOR_GATEWAY__METRICS_TOKEN" not in env(own, GATEWAY)
    [endpoint] = one(own, "ServiceMonitor", GATEWAY)["spec"]["endpoints"]
    assert "authorization" not in endpoint
