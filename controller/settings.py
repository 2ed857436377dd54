"""Settings from the environment (`GOVERNOR_` prefix, `__` between groups), each documented."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class PrometheusSettings(BaseModel):
    """Where signals are read from."""

    url: str = Field("http://127.0.0.1:9090", description="Prometheus base URL")
    timeout_seconds: float = Field(5.0, gt=0, description="per-query timeout, seconds")
    max_concurrency: int = Field(8, ge=1, description="queries run at once per tick")
    bearer_token: SecretStr | None = Field(None, description="sent as Authorization: Bearer")
    username: str | None = Field(None, description="basic auth user")
    password: SecretStr | None = Field(None, description="basic auth password")
    ca_file: Path | None = Field(None, description="CA bundle for TLS; default: system CAs")
    verify_tls: bool = Field(True, description="verify the server certificate")
    headers: dict[str, str] = Field(default_factory=dict, description="extra HTTP headers")
    sample_age_refresh_seconds: float = Field(
        10.0,
        ge=0,
        description="ask each selector's newest-sample time at most this often (0: every "
        "tick); in between the last answer is reused, so signal ages are over-estimated by "
        "at most this much, never under-estimated",
    )


class RedisSettings(BaseModel):
    """Where limits, overrides and the journal live."""

    url: SecretStr | None = Field(
        None,
        description="redis://, rediss:// or unix:// URL (may hold a password, so it is "
        "masked); unset: an embedded Redis is started",
    )
    username: str | None = Field(None, description="ACL user, if not in the URL")
    password: SecretStr | None = Field(None, description="AUTH password, if not in the URL")
    key_prefix: str = Field("governor", description="prefix of every key Governor owns")
    socket_timeout_seconds: float = Field(2.0, gt=0, description="per-command timeout")
    retries: int = Field(
        3, ge=0, le=20, description="retries of a failed write (connection errors, timeouts)"
    )
    retry_backoff_seconds: float = Field(
        0.05, gt=0, description="first retry delay, doubled per retry (capped at 2 s)"
    )
    ca_file: Path | None = Field(None, description="CA bundle for rediss://; default: system CAs")
    verify_tls: bool = Field(True, description="verify the server certificate for rediss://")


class ControllerSettings(BaseModel):
    """The control loop."""

    policy_dir: Path = Field(Path("policies"), description="directory of policy YAML files")
    tick_seconds: float = Field(5.0, gt=0, description="time between ticks, seconds")
    dry_run: bool = Field(False, description="journal what would change, write nothing")


class JournalSettings(BaseModel):
    """The audit journal."""

    stream_max_length: int = Field(100_000, ge=100, description="events kept in the stream")
    buffer_max_events: int = Field(10_000, ge=1, description="events held while Redis is away")
    runbook_base_url: str = Field(
        "https://github.com/governor/governor/blob/main/",
        description="prefix for relative runbook links in journal events",
    )


class TelemetrySettings(BaseModel):
    """The controller's own /metrics, /healthz and /readyz."""

    host: str = Field("0.0.0.0", description="listen address")
    port: int = Field(9100, ge=0, le=65535, description="listen port; 0 disables")


class Settings(BaseSettings):
    """Every setting of Governor. Environment: GOVERNOR_<GROUP>__<FIELD>."""

    model_config = SettingsConfigDict(
        env_prefix="GOVERNOR_", env_nested_delimiter="__", extra="forbid"
    )

    prometheus: PrometheusSettings = Field(default_factory=PrometheusSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    controller: ControllerSettings = Field(default_factory=ControllerSettings)
    journal: JournalSettings = Field(default_factory=JournalSettings)
    telemetry: TelemetrySettings = Field(default_factory=TelemetrySettings)
    log_level: str = Field("info", description="debug, info, warning or error")
