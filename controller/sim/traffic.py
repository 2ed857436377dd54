"""The simulated tenants and their arrivals: patterns, events, trace replay; seeded.

Every step the simulator asks for the requests arriving in [t, t + dt). Synthetic tenants
send a Poisson number of requests at their rate × pattern × event factors, with log-normal
sizes; the trace replays its arrivals time-scaled; a DDoS botnet spreads its requests over
its keys and addresses. Everything is drawn from one seeded generator, in a fixed order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from controller.model import FloatArray, model_key
from controller.sim.scenario import Diurnal, Event, RequestSize, Scenario
from controller.sim.trace import IntArray, TraceData, assign_tenants, zipf_shares

Role = Literal["tenant", "trace", "attacker"]
DAY = 86400.0
_SIZE_SAMPLES = 20_000  # draws used to estimate a size distribution's means (fixed seed)


@dataclass(frozen=True)
class SimTenant:
    """One tenant as the simulator sees it."""

    index: int
    name: str
    group: str
    plan: str
    model: str
    rate: float  # mean requests/s before patterns and events
    size: RequestSize
    first_ip: int  # its client addresses are first_ip .. first_ip + ips - 1
    ips: int
    users: int
    credits_usd: float
    role: Role = "tenant"
    pattern: Literal["steady", "diurnal"] = "steady"
    diurnal: Diurnal = field(default_factory=Diurnal)
    mean_prompt: float = 0.0
    mean_output: float = 0.0

    @property
    def well_behaved(self) -> bool:
        return self.role != "attacker"

    @property
    def model_key(self) -> str:
        """Its model as the gateways limit it (without regard to case)."""
        return model_key(self.model)


@dataclass(frozen=True)
class Arrivals:
    """The requests of one step, sorted by arrival time."""

    time: FloatArray
    tenant: IntArray
    ip: IntArray
    user: IntArray  # -1: no user id
    prompt: FloatArray
    output: FloatArray
    max_tokens: FloatArray

    def __len__(self) -> int:
        return len(self.time)


def _empty() -> Arrivals:
    f, i = np.empty(0), np.empty(0, dtype=np.int64)
    return Arrivals(f, i, i, i, f, f, f)


def size_means(size: RequestSize) -> tuple[float, float]:
    """Mean prompt and output tokens of a size distribution (output capped at max_tokens)."""
    rng = np.random.default_rng(0)
    prompt = _lognormal(rng, size.prompt.median, size.prompt.sigma, size.prompt.max, _SIZE_SAMPLES)
    cap = min(size.output.max, size.max_tokens)
    output = _lognormal(rng, size.output.median, size.output.sigma, cap, _SIZE_SAMPLES)
    return float(prompt.mean()), float(output.mean())


def _lognormal(
    rng: np.random.Generator,
    median: float | FloatArray,
    sigma: float | FloatArray,
    cap: float | FloatArray,
    count: int,
) -> FloatArray:
    drawn = np.rint(median * np.exp(sigma * rng.standard_normal(count)))
    out: FloatArray = np.clip(drawn, 1.0, cap)
    return out


@dataclass
class World:
    """The tenants, the trace and the events of a scenario, and the arrival generator."""

    scenario: Scenario
    tenants: list[SimTenant]
    trace: TraceData | None = None
    trace_tenants: IntArray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    runaway: dict[int, Event] = field(default_factory=dict)
    ddos: list[tuple[Event, int, int, int]] = field(default_factory=list)  # event, first key,
    # first ip, ips

    @property
    def start(self) -> float:
        return self.scenario.start_time

    def names(self) -> list[str]:
        return [t.name for t in self.tenants]

    def pattern(self, tenant: SimTenant, at: float) -> float:
        """The tenant's rate multiplier from its daily pattern at unix time `at`."""
        if tenant.pattern == "steady":
            return 1.0
        hours, minutes = (int(x) for x in tenant.diurnal.peak.split(":"))
        peak = hours * 3600 + minutes * 60
        phase = 2 * math.pi * ((at % DAY) - peak) / DAY
        return 1.0 + tenant.diurnal.amplitude * math.cos(phase)

    def factor(self, tenant: SimTenant, elapsed: float) -> float:
        """The product of every event factor acting on a tenant `elapsed` seconds in."""
        out = 1.0
        for event in self.scenario.events:
            if not event.at <= elapsed < event.end:
                continue
            if (event.kind == "burst" and self._in_burst(tenant, event)) or (
                event.kind == "runaway" and event.tenants == [tenant.name]
            ):
                out *= event.factor
        return out

    def _in_burst(self, tenant: SimTenant, event: Event) -> bool:
        if not event.tenants:
            return tenant.role == "tenant" and not self.is_runaway(tenant.index)
        return tenant.name in event.tenants or tenant.group in event.tenants

    def is_runaway(self, index: int) -> bool:
        return index in self.runaway

    def has_own_event(self, tenant: SimTenant) -> bool:
        """Whether an event changes this tenant's own demand (a burst naming it, or every
        well-behaved tenant; a runaway naming it)."""
        return any(
            (e.kind == "burst" and self._in_burst(tenant, e))
            or (e.kind == "runaway" and e.tenants == [tenant.name])
            for e in self.scenario.events
        )

    def rates(self, elapsed: float) -> FloatArray:
        """Requests/s of every synthetic tenant now (trace and attackers: 0 here)."""
        at = self.start + elapsed
        return np.array(
            [
                t.rate * self.pattern(t, at) * self.factor(t, elapsed) if t.role == "tenant" else 0
                for t in self.tenants
            ],
            dtype=np.float64,
        )

    def usual_rates(self, at: float) -> FloatArray:
        """Requests/s of every tenant at unix time `at` with no event: the history before the
        run (the trace's tenants at their average rate; attackers did not exist)."""
        return np.array(
            [t.rate * self.pattern(t, at) if t.role != "attacker" else 0.0 for t in self.tenants],
            dtype=np.float64,
        )

    def arrivals(self, elapsed: float, dt: float, rng: np.random.Generator) -> Arrivals:
        """The requests arriving in [elapsed, elapsed + dt), sorted by time."""
        parts = [self._synthetic(elapsed, dt, rng)]
        if self.trace is not None:
            parts.append(self._replayed(elapsed, dt, rng))
        for event, first_key, first_ip, ips in self.ddos:
            if event.at <= elapsed < event.end:
                parts.append(self._botnet(event, first_key, first_ip, ips, elapsed, dt, rng))
        parts = [p for p in parts if len(p)]
        if not parts:
            return _empty()
        joined = Arrivals(*(np.concatenate([getattr(p, f) for p in parts]) for f in _FIELDS))
        order = np.argsort(joined.time, kind="stable")
        return Arrivals(*(getattr(joined, f)[order] for f in _FIELDS))

    def _synthetic(self, elapsed: float, dt: float, rng: np.random.Generator) -> Arrivals:
        counts = rng.poisson(self.rates(elapsed + dt / 2) * dt)
        total = int(counts.sum())
        if total == 0:
            return _empty()
        tenant = np.repeat(np.arange(len(self.tenants), dtype=np.int64), counts)
        return self._requests(tenant, elapsed + rng.random(total) * dt, rng)

    def _requests(
        self,
        tenant: IntArray,
        time: FloatArray,
        rng: np.random.Generator,
        prompt: FloatArray | None = None,
        output: FloatArray | None = None,
    ) -> Arrivals:
        profiles = [self.tenants[i] for i in tenant.tolist()]
        count = len(tenant)
        first_ip = np.array([p.first_ip for p in profiles], dtype=np.int64)
        ips = np.array([p.ips for p in profiles], dtype=np.int64)
        users = np.array([p.users for p in profiles], dtype=np.int64)
        ip = first_ip + (rng.random(count) * ips).astype(np.int64)
        user = np.where(users > 0, (rng.random(count) * users).astype(np.int64), -1)
        max_tokens = np.array([p.size.max_tokens for p in profiles], dtype=np.float64)
        if prompt is None or output is None:
            prompt = _lognormal(
                rng,
                np.array([p.size.prompt.median for p in profiles]),
                np.array([p.size.prompt.sigma for p in profiles]),
                np.array([p.size.prompt.max for p in profiles], dtype=np.float64),
                count,
            )
            output = _lognormal(
                rng,
                np.array([p.size.output.median for p in profiles]),
                np.array([p.size.output.sigma for p in profiles]),
                np.array([p.size.output.max for p in profiles], dtype=np.float64),
                count,
            )
        return Arrivals(time, tenant, ip, user, prompt, np.minimum(output, max_tokens), max_tokens)

    def _replayed(self, elapsed: float, dt: float, rng: np.random.Generator) -> Arrivals:
        assert self.trace is not None
        speed = self.scenario.trace.speed if self.scenario.trace else 1.0
        offsets = self.trace.offsets / speed
        low, high = np.searchsorted(offsets, [elapsed, elapsed + dt], side="left")
        if high <= low:
            return _empty()
        window = slice(int(low), int(high))
        return self._requests(
            self.trace_tenants[window],
            offsets[window],
            rng,
            self.trace.prompt[window],
            self.trace.output[window],
        )

    def _botnet(
        self,
        event: Event,
        first_key: int,
        first_ip: int,
        ips: int,
        elapsed: float,
        dt: float,
        rng: np.random.Generator,
    ) -> Arrivals:
        total = int(rng.poisson(event.rate * dt))
        if total == 0:
            return _empty()
        tenant = first_key + (rng.random(total) * event.keys).astype(np.int64)
        arrivals = self._requests(tenant, elapsed + rng.random(total) * dt, rng)
        ip = first_ip + (rng.random(total) * ips).astype(np.int64)
        return Arrivals(
            arrivals.time,
            arrivals.tenant,
            ip,
            arrivals.user,
            arrivals.prompt,
            arrivals.output,
            arrivals.max_tokens,
        )


_FIELDS = ("time", "tenant", "ip", "user", "prompt", "output", "max_tokens")


def build_world(scenario: Scenario, trace: TraceData | None, seed: int) -> World:
    """Expand tenant groups, the trace's tenants and the botnet's keys into one tenant list."""
    tenants: list[SimTenant] = []
    next_ip = 0
    for group in scenario.tenants:
        prompt, output = size_means(group.size)
        for i in range(group.count):
            name = group.name if group.count == 1 else f"{group.name}-{i}"
            tenants.append(
                SimTenant(
                    index=len(tenants),
                    name=name,
                    group=group.name,
                    plan=group.plan,
                    model=group.model,
                    rate=group.rate,
                    size=group.size,
                    first_ip=next_ip,
                    ips=group.ips,
                    users=group.users,
                    credits_usd=group.credits_usd,
                    pattern=group.pattern,
                    diurnal=group.diurnal,
                    mean_prompt=prompt,
                    mean_output=output,
                )
            )
            next_ip += group.ips
    world = World(scenario, tenants)
    if scenario.trace is not None and trace is not None:
        next_ip = _add_trace(world, trace, seed, next_ip)
    for event in scenario.events:
        if event.kind == "runaway":
            found = [t.index for t in world.tenants if t.name == event.tenants[0]]
            if not found:
                raise ValueError(
                    f"runaway event names tenant {event.tenants[0]!r}, which no tenant group "
                    f"makes (tenants: {', '.join(world.names()[:10])}...)"
                )
            world.runaway[found[0]] = event
        elif event.kind == "ddos":
            next_ip = _add_botnet(world, event, next_ip)
    return world


def _add_trace(world: World, trace: TraceData, seed: int, next_ip: int) -> int:
    spec = world.scenario.trace
    assert spec is not None
    shares = zipf_shares(spec.tenants, spec.zipf)
    first = len(world.tenants)
    mean_rate = len(trace.offsets) / max(trace.span, 1.0) * spec.speed
    size = RequestSize(max_tokens=spec.max_tokens)
    for k in range(spec.tenants):
        world.tenants.append(
            SimTenant(
                index=first + k,
                name=f"{spec.name}-{k}",
                group=spec.name,
                plan=spec.plan,
                model=spec.model,
                rate=float(shares[k]) * mean_rate,
                size=size,
                first_ip=next_ip,
                ips=spec.ips,
                users=0,
                credits_usd=1e9,
                role="trace",
                mean_prompt=float(trace.prompt.mean()),
                mean_output=float(np.minimum(trace.output, spec.max_tokens).mean()),
            )
        )
        next_ip += spec.ips
    # Its own generator: the split does not depend on anything else drawn.
    world.trace = trace
    world.trace_tenants = first + assign_tenants(
        len(trace.offsets), shares, np.random.default_rng([seed, 1])
    )
    return next_ip


def _add_botnet(world: World, event: Event, next_ip: int) -> int:
    first_key = len(world.tenants)
    prompt, output = size_means(event.size)
    for k in range(event.keys):
        world.tenants.append(
            SimTenant(
                index=first_key + k,
                name=f"bot-{len(world.ddos)}-{k}",
                group="botnet",
                plan=event.plan,
                model=event.model,
                rate=event.rate / event.keys,
                size=event.size,
                first_ip=next_ip,
                ips=1,
                users=0,
                credits_usd=1e9,
                role="attacker",
                mean_prompt=prompt,
                mean_output=output,
            )
        )
    world.ddos.append((event, first_key, next_ip, event.ips))
    return next_ip + event.ips


BoolArray = npt.NDArray[np.bool_]
