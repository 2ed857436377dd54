"""The enforcement scripts and gateway settings as files, for the nginx module and Kong plugin.

`governor gateway export-lua DIR` writes `admit.lua` and `settle.lua` byte for byte as
Python sends them to Redis (lib.lua + the script: same SHA1, so every gateway shares one
loaded script), and `governor.json`: their SHA1s and the non-secret settings a Lua gateway
needs to answer exactly as `governor gateway` does (deploy/nginx/, docs/nginx-kong.md).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from controller.clients.scripts import ADMIT, CHARGE, SETTLE, Script
from controller.contract.keys import KeySchema
from controller.errors import ConfigurationError
from controller.gateway.admission import Admission
from controller.gateway.prices import PriceTable
from controller.model import model_key
from controller.settings import GatewaySettings, PricesSettings

# charge.lua: a background Responses answer settled at its usage when it is read.
EXPORTED: tuple[Script, ...] = (ADMIT, SETTLE, CHARGE)
SETTINGS_FILE = "governor.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ExportedFile:
    """One file written, and the SHA1 Redis knows it by (None for the settings file)."""

    path: Path
    sha: str | None


def _admission_default(name: str) -> Any:
    # The lease and history defaults live on Admission; read them there, never restate them.
    return inspect.signature(Admission.__init__).parameters[name].default


def gateway_document(
    gateway: GatewaySettings, prices: PricesSettings, key_prefix: str
) -> dict[str, Any]:
    """What `governor.json` holds: script SHA1s and the settings answers depend on."""
    table = PriceTable.from_settings(prices)
    return {
        "format": FORMAT_VERSION,
        "scripts": {script.name: script.sha for script in EXPORTED},
        "key_prefix": KeySchema(key_prefix).prefix,
        "prices": {
            "models": {name: price.model_dump() for name, price in sorted(table.models.items())},
            "default": table.default.model_dump(),
        },
        "default_max_tokens": gateway.default_max_tokens,
        "max_body_bytes": gateway.max_body_bytes,
        "retry_after_jitter": gateway.retry_after_jitter,
        "problem_base_url": gateway.problem_base_url,
        "key_cache_seconds": gateway.key_cache_seconds,
        "trust_forwarded_for": gateway.trust_forwarded_for,
        "previous_response_ttl_seconds": gateway.previous_response_ttl_seconds,
        "unknown_previous_response_tokens": gateway.unknown_previous_response_tokens,
        # `tenant` refuses an id the tenant's records lack; `shared` reserves the default.
        "previous_response_scope": gateway.previous_response_scope,
        # How long, and how many at once, a lookup without a record waits for it (`tenant`).
        "previous_response_wait_seconds": gateway.previous_response_wait_seconds,
        "previous_response_waiters": gateway.previous_response_waiters,
        # Lower-cased as the module meets models (string.lower), so it looks them up as is.
        "context_windows": {
            model_key(name): tokens for name, tokens in sorted(gateway.context_windows.items())
        },
        # The label caps of the metrics (controller/gateway/metrics.py's LabelCap).
        "metrics_max_tenants": gateway.metrics_max_tenants,
        "metrics_max_models": gateway.metrics_max_models,
        "plan_refresh_seconds": 5.0,  # PlanCatalog's default refresh
        "lease_seconds": _admission_default("lease_seconds"),
        "record_grace_seconds": _admission_default("record_grace_seconds"),
        "history_length": _admission_default("history_length"),
    }


def export_lua(
    directory: Path, gateway: GatewaySettings, prices: PricesSettings, key_prefix: str
) -> list[ExportedFile]:
    """Write the scripts and `governor.json` into `directory` (created if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        written: list[ExportedFile] = []
        for script in EXPORTED:
            path = directory / f"{script.name}.lua"
            # Bytes, not text: no newline translation may change the SHA1.
            path.write_bytes(script.source.encode())
            written.append(ExportedFile(path, script.sha))
        settings = directory / SETTINGS_FILE
        document = gateway_document(gateway, prices, key_prefix)
        settings.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        written.append(ExportedFile(settings, None))
    except OSError as exc:
        raise ConfigurationError(
            f"cannot write the Lua export to {directory}: {exc.strerror}; pass a writable directory"
        ) from exc
    return written
