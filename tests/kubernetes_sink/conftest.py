"""Fixtures: the loopback Kubernetes API (tests/support/kube_api.py) serving KongPlugins,
KongClusterPlugins and ConfigMaps, a real `kubernetes` client on it, and sinks on that."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from kubernetes import client as k8s

from controller.settings import KongSettings, KubernetesSinkSettings
from controller.sinks.configmap import ConfigMapSink
from controller.sinks.kubernetes import KubernetesSink
from tests.support.kube_api import CONFIG_MAPS, KONG_CLUSTER_PLUGINS, KONG_PLUGINS, KubeApi
from tests.support.sink_ticks import Registry

NAMESPACE = "kong"


@pytest.fixture
def kube() -> Iterator[KubeApi]:
    server = KubeApi(resources=(KONG_PLUGINS, KONG_CLUSTER_PLUGINS, CONFIG_MAPS)).start()
    yield server
    server.stop()


@pytest.fixture
def api(kube: KubeApi) -> Iterator[Any]:
    configuration = k8s.Configuration()
    configuration.host = kube.url
    with k8s.ApiClient(configuration) as api_client:
        yield api_client


PluginSinkFactory = Callable[..., KubernetesSink]


@pytest.fixture
def make_sink(api: Any) -> PluginSinkFactory:
    def make(
        registry: Registry | None = None, kong: KongSettings | None = None, **options: Any
    ) -> KubernetesSink:
        settings = KubernetesSinkSettings(**{"namespace": NAMESPACE, **options})
        return KubernetesSink.from_settings(
            settings, kong or KongSettings(), api, namespace=NAMESPACE, registry=registry
        )

    return make


@pytest.fixture
def configmap_sink(api: Any) -> ConfigMapSink:
    return ConfigMapSink(KubernetesSinkSettings(namespace=NAMESPACE), api, namespace=NAMESPACE)


def objects(kube: KubeApi, cluster: bool = False) -> dict[str, dict[str, Any]]:
    """The stored KongPlugins (or KongClusterPlugins) by name."""
    if cluster:
        return kube.objects(KONG_CLUSTER_PLUGINS, "")
    return kube.objects(KONG_PLUGINS, NAMESPACE)
