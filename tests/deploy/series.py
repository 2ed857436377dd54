"""Series names: what the controller and the gateway export, and what alerts may read."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry

METRIC = re.compile(r"\b((?:governor|gateway)_[a-z_]+)\b")
# Series an alert reads that their exporter does not have yet, with where they must come from.
# Once the exporter has one, remove it here (test_alert_rules insists).
PENDING_METRICS: dict[str, str] = {}
_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count"),
    "gauge": ("",),
    "info": ("_info",),
}


def series_names(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry's metric families expose (counters with `_total`...)."""
    names: set[str] = set()
    for family in registry.collect():
        names.update(family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",)))
    return names
