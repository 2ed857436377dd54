"""Kubernetes API credentials, one rule for every user (the sinks and the leader Lease)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from controller.errors import ConfigurationError

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def api_client(kubeconfig: Path | None, context: str | None, needed_for: str) -> Any:
    """A kubernetes ApiClient: in-cluster credentials when running in a pod and no kubeconfig
    is set, else the kubeconfig (its `context`). ConfigurationError names `needed_for`."""
    configuration = k8s.Configuration()
    try:
        if kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ:
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=configuration
            )
        else:
            k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig) if kubeconfig else None,
                context=context,
                client_configuration=configuration,
            )
    except (k8s_config.ConfigException, OSError) as exc:
        raise ConfigurationError(
            f"{needed_for} needs Kubernetes API credentials: {exc} (run in a pod with a "
            "ServiceAccount, or set GOVERNOR_KUBERNETES_SINK__KUBECONFIG)"
        ) from exc
    return k8s.ApiClient(configuration)


def pod_namespace() -> str | None:
    """The namespace of the pod this runs in; None outside a pod."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or None
    except OSError:
        return None
