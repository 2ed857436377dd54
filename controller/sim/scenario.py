"""Scenario files (YAML): the fleet, the tenants and their traffic, the events, the goals.

Strict like the policy files: unknown fields are errors, and every error names
file:line:column and the field path. See docs/simulator.md for the reference.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from controller.contract.catalog import Strict
from controller.errors import GovernorError
from controller.model import Address
from controller.policy.diagnostics import format_path
from controller.policy.documents import AddressField, Duration
from controller.policy.sourcemap import parse_yaml

# A decode token costs this many prompt tokens' GPU time: SARATHI (Agrawal et al. 2023,
# arXiv:2308.16369): decodes in a compute-saturated batch cost "up to an order of magnitude
# less" than in a decode-only one, decode throughput up to 10× (docs/simulator.md).
PREFILL_DECODE_RATIO = 10.0
# The shipped policies' saturation signal over vLLM's metrics
# (policies/global-inflight-by-gpu.yaml).
SATURATION = (
    "max(avg by (model_name) (vllm:kv_cache_usage_perc) + clamp_max(sum by (model_name)"
    " (vllm:num_requests_waiting) / clamp_min(sum by (model_name) (vllm:num_requests_running),"
    " 1), 1) or label_replace(avg(vllm:kv_cache_usage_perc) + clamp_max("
    "sum(vllm:num_requests_waiting) / clamp_min(sum(vllm:num_requests_running), 1), 1),"
    ' "model_name", "(fleet)", "", ""))'
)
SCENARIO_DIR = Path(__file__).parent / "scenarios"
REPO_ROOT = Path(__file__).resolve().parents[2]


class ScenarioError(GovernorError):
    """A scenario file that cannot be used; the message names file:line:col and the fix."""


class LogNormal(Strict):
    """A token count drawn from a log-normal distribution, capped at `max`."""

    median: float = Field(gt=0, description="e^mu: half the requests are smaller")
    sigma: float = Field(ge=0, description="standard deviation of the log")
    max: int = Field(gt=0, description="largest value drawn")


class RequestSize(Strict):
    """Prompt and output tokens of a request. Defaults: a log-moment fit to the Azure LLM
    inference conversation trace 2023 (Patel et al., "Splitwise", ISCA 2024, CC BY 4.0)."""

    prompt: LogNormal = LogNormal(median=760, sigma=0.985, max=14050)
    output: LogNormal = LogNormal(median=151, sigma=0.859, max=1000)
    max_tokens: int = Field(1024, gt=0, description="the client's max_tokens (output cap)")


class Diurnal(Strict):
    """A daily sine: rate × (1 + amplitude × cos(2π (t - peak) / 24h))."""

    amplitude: float = Field(0.5, ge=0, le=1)
    peak: str = Field("14:00", pattern=r"^([01]\d|2[0-3]):[0-5]\d$", description="UTC time")


class TenantGroup(Strict):
    """`count` tenants named `<name>-<i>` (or just `name` when count is 1) with one profile."""

    name: str = Field(pattern=r"^[a-z][a-z0-9-]{0,40}$")
    count: int = Field(1, ge=1, le=10_000)
    plan: str
    model: str = "gpt-3.5-turbo"
    rate: float = Field(ge=0, description="mean requests per second of each tenant")
    ips: int = Field(1, ge=1, description="client addresses the tenant's traffic comes from")
    users: int = Field(0, ge=0, description="end users (0: requests carry no user id)")
    pattern: Literal["steady", "diurnal"] = "steady"
    diurnal: Diurnal = Diurnal()
    size: RequestSize = RequestSize()
    credits_usd: float = Field(1e9, ge=0, description="prepaid balance (plans with credits)")


class Event(Strict):
    """Something that happens during the run."""

    kind: Literal["burst", "runaway", "ddos", "signal_outage", "capacity"]
    at: Duration
    duration: Duration = Field(gt=0)
    factor: float = Field(
        5.0, gt=0, description="burst/runaway: rate multiplier; capacity: share of GPUs up"
    )
    pool: str = Field("", description="capacity: the pool that loses GPUs (empty: every pool)")
    tenants: list[str] = Field(
        default_factory=list,
        description="burst: tenant or group names (empty: every well-behaved tenant); "
        "runaway: exactly one tenant",
    )
    # ddos: a botnet sending `rate` requests/s from `ips` addresses with `keys` API keys.
    rate: float = Field(0.0, ge=0)
    ips: int = Field(1000, ge=1)
    keys: int = Field(10, ge=1)
    plan: str = "free"
    model: str = "gpt-3.5-turbo"
    size: RequestSize = RequestSize(
        prompt=LogNormal(median=200, sigma=0.5, max=2000),
        output=LogNormal(median=50, sigma=0.5, max=256),
        max_tokens=256,
    )
    # signal_outage: the named metric stops being scraped.
    metric: str = "DCGM_FI_DEV_GPU_UTIL"

    @property
    def end(self) -> float:
        return self.at + self.duration


class Pool(Strict):
    """GPUs serving models like vLLM: capacity and the engine's parameters (docs/simulator.md)."""

    name: str = "inference"
    models: list[str] = Field(default_factory=list, description="empty: every model")
    gpus: int = Field(8, ge=1)
    capacity_tokens_per_second: float = Field(
        gt=0, description="prompt + output tokens/s at saturation, at the pool's traffic mix"
    )
    batch_slots: int = Field(16, ge=1, description="vLLM's max_num_seqs, per GPU")
    prefill_tokens_per_second: float = Field(
        10_000, gt=0, description="one prompt's prefill speed on one GPU"
    )
    decode_tokens_per_second: float = Field(50, gt=0, description="per sequence, idle pool")
    decode_slowdown: float = Field(
        0.5, ge=0, description="per-sequence decode speed ÷ (1 + this × batch fill)"
    )
    prefill_decode_ratio: float = Field(
        PREFILL_DECODE_RATIO,
        gt=0,
        description="GPU time of a decode token ÷ that of a prompt token (docs/simulator.md)",
    )
    kv_cache_tokens: int = Field(16_384, ge=1, description="KV-cache capacity per GPU, tokens")
    max_num_batched_tokens: int = Field(
        8192, ge=1, description="vLLM's token budget of an engine iteration, per GPU"
    )
    engine_step_seconds: float = Field(
        0.5, gt=0, description="the pool is stepped this often (at most the scenario's step)"
    )
    timeout_seconds: float = Field(60, gt=0, description="clients give up without a first token")

    def concurrency(self, mean_work: float) -> float:
        """The requests it can hold at once: its batch slots, or its KV cache filled with
        requests of `mean_work` tokens (prompt + output), whichever binds first."""
        return min(self.batch_slots * self.gpus, self.kv_cache_tokens * self.gpus / mean_work)


class Trace(Strict):
    """Replay of a request trace: CSV or JSON lines with an arrival time and the prompt and
    output tokens (the Azure LLM inference, BurstGPT and Mooncake formats, or the same
    columns under the names docs/simulator.md lists), from `start` for the run's duration."""

    file: str
    speed: float = Field(1.0, gt=0, description="time scale: 3 replays at 3× the rate")
    start: Duration = Field(0.0, description="where the replay starts, from the first request")
    time_unit: Literal["s", "ms"] | None = Field(
        None, description="numeric times' unit (default: s in CSV, ms in JSON lines)"
    )
    tenants: int = Field(20, ge=1, description="requests are split over this many tenants")
    zipf: float = Field(1.0, ge=0, description="tenant k gets a share ∝ 1/(k+1)^zipf")
    name: str = "trace"
    plan: str = "enterprise"
    model: str = "gpt-4"
    ips: int = Field(4, ge=1)
    max_tokens: int = Field(1024, gt=0)


class PlainAimd(Strict):
    """The `plain AIMD` comparison: every tick ×decrease above the setpoint, +increase below;
    no band, no stabilization, no step limits."""

    target: AddressField = Address.parse("global/tokens_per_minute")
    signal: str = SATURATION
    increase: float | None = Field(None, gt=0, description="default: 5% of the baseline")
    decrease_factor: float = Field(0.8, gt=0, lt=1)
    min: float | None = Field(None, ge=0, description="default: the floor, else 5% of baseline")
    max: float | None = Field(None, gt=0, description="default: the ceiling, else the baseline")


class Slo(Strict):
    ttft_seconds: float = Field(2.0, gt=0, description="a request is good if TTFT ≤ this")


class Scenario(Strict):
    """One simulated run's world."""

    name: str
    description: str = ""
    start: dt.datetime = dt.datetime(2026, 3, 3, 10, 0, tzinfo=dt.UTC)
    duration: Duration = Field(3600.0, gt=0)
    tick: Duration = Field(15.0, gt=0, description="controller tick")
    step: Duration = Field(1.0, gt=0, description="traffic and queue time step")
    scrape_interval: Duration = Field(15.0, gt=0)
    seed: int = 1
    target_utilization: float = Field(0.8, gt=0, le=1)
    slo: Slo = Slo()
    pools: list[Pool] = Field(min_length=1)
    tenants: list[TenantGroup] = Field(default_factory=list)
    trace: Trace | None = None
    events: list[Event] = Field(default_factory=list)
    signals: dict[str, str] = Field(
        default_factory=dict,
        description="policy query text → PromQL over the simulator's metrics, for queries "
        "the simulator does not recognise",
    )
    plain_aimd: PlainAimd = PlainAimd()

    @field_validator("start")
    @classmethod
    def _aware(cls, value: dt.datetime) -> dt.datetime:
        if value.tzinfo is None:
            raise ValueError("start needs a time zone, e.g. 2026-03-03T10:00:00Z")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Scenario:
        ratio = self.tick / self.step
        if abs(ratio - round(ratio)) > 1e-9:
            raise ValueError(f"tick ({self.tick:g}s) must be a multiple of step ({self.step:g}s)")
        if not self.tenants and self.trace is None:
            raise ValueError("a scenario needs `tenants`, a `trace`, or both")
        names = [g.name for g in self.tenants]
        if len(set(names)) != len(names):
            raise ValueError("tenant group names must be unique")
        for event in self.events:
            if event.kind == "runaway" and len(event.tenants) != 1:
                raise ValueError("a runaway event names exactly one tenant in `tenants`")
        return self

    @property
    def start_time(self) -> float:
        return self.start.timestamp()

    @property
    def ticks(self) -> int:
        return round(self.duration / self.tick)

    def without_events(self) -> Scenario:
        """The no-overload baseline: the same world with nothing happening, and a trace
        replayed at its own pace (1×) over the same length of time."""
        update: dict[str, object] = {"events": []}
        if self.trace is not None:
            update["trace"] = self.trace.model_copy(update={"speed": 1.0})
        return self.model_copy(update=update)


def scenario_names() -> list[str]:
    """The shipped scenarios (files under controller/sim/scenarios/)."""
    return sorted(p.stem for p in SCENARIO_DIR.glob("*.yaml"))


def find_scenario(name_or_path: str) -> Path:
    """A shipped scenario by name, or a path to a scenario file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    shipped = SCENARIO_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise ScenarioError(
        f"no scenario {name_or_path!r}: give a shipped name ({', '.join(scenario_names())}) "
        "or the path of a scenario YAML file"
    )


def load_scenario(name_or_path: str) -> Scenario:
    """Read and validate a scenario; raise ScenarioError naming file:line:col and field."""
    path = find_scenario(name_or_path)
    source = parse_yaml(path.read_text(encoding="utf-8"))
    problems = [*source.problems, *(p for d in source.documents for p in d.problems)]
    if problems:
        lines = [f"{path}:{p.position.line}:{p.position.column}: {p.message}" for p in problems]
        raise ScenarioError("\n".join(lines))
    if len(source.documents) != 1:
        raise ScenarioError(f"{path}:1:1: a scenario file holds exactly one YAML document")
    document = source.documents[0]
    try:
        return Scenario.model_validate(document.value)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            loc = tuple(part for part in error["loc"] if not str(part).startswith("function-"))
            _, spot = document.spot(loc)
            where = format_path(loc) or "(document)"
            lines.append(f"{path}:{spot.value.line}:{spot.value.column}: {where}: {error['msg']}")
        raise ScenarioError("\n".join(lines)) from None


def resolve_data_file(text: str, scenario_file: Path | None = None) -> Path:
    """A data file named by a scenario: absolute, else relative to the working directory, the
    scenario's folder or the repository root. Traces shipped in the package are named
    `shipped:<name>` instead (controller.sim.trace.open_trace)."""
    path = Path(text)
    candidates = [path] if path.is_absolute() else [Path.cwd() / path, REPO_ROOT / path]
    if scenario_file is not None and not path.is_absolute():
        candidates.insert(1, scenario_file.parent / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ScenarioError(
        f"trace file {text!r} not found (looked in {', '.join(str(c) for c in candidates)}); "
        "pass the CSV's path with --trace or fix `trace.file`"
    )
