"""A GPU pool: capacity in tokens/s and a queueing latency model (docs/simulator.md).

Model: the pool is an M/M/c queue whose c servers are its batch slots (GPUs × slots), each
completing work at capacity / c tokens/s (continuous batching shares a GPU between its
sequences). Below saturation a request waits with the Erlang-C probability, then an
exponential time with rate c·μ·(1−ρ), ρ the admitted load smoothed over ~10 s; so TTFT stays
flat until ρ nears 1 and then climbs.
Above saturation the excess work queues as a fluid backlog served first-in first-out, and
requests that would wait longer than the clients' timeout give up without using the GPUs.
TTFT = queueing wait + prompt / prefill speed; the time per output token grows with load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller.model import FloatArray
from controller.sim.scenario import Pool

_RHO_MAX = 0.995  # the stochastic part is evaluated below this; above it the backlog rules
# The steady-state formula needs a steady load: it reads the admitted load smoothed over about
# this long (the queue's memory); a single step's excess goes to the fluid backlog instead.
SMOOTHING_SECONDS = 10.0


def erlang_c(servers: int, load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load `load` = c·ρ."""
    if load <= 0:
        return 0.0
    if load >= servers:
        return 1.0
    blocking = 1.0  # Erlang B by its stable recursion
    for k in range(1, servers + 1):
        blocking = load * blocking / (k + load * blocking)
    return servers * blocking / (servers - load * (1.0 - blocking))


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one time step did to the pool and to the requests admitted in it."""

    utilization: float  # served work / capacity over the step (what DCGM would report)
    offered: float  # admitted work / capacity (can exceed 1)
    backlog: float  # work waiting at the end of the step, tokens
    ttft: FloatArray  # per admitted request, seconds
    e2e: FloatArray  # per admitted request, seconds (arrival → last token)
    timed_out: npt.NDArray[np.bool_]  # gave up queueing (used nothing)


@dataclass
class PoolModel:
    """One pool's queue state across steps."""

    spec: Pool
    mean_work: float  # tokens per request, for the service rate of a slot
    backlog: float = 0.0
    load: float = 0.0  # admitted work / capacity, smoothed over SMOOTHING_SECONDS
    scale: float = 1.0  # share of the pool's GPUs up (a `capacity` event: a node down)
    _erlang: dict[int, float] = field(default_factory=dict)

    @property
    def capacity(self) -> float:
        """Tokens/s of the GPUs up now."""
        return self.spec.capacity_tokens_per_second * self.scale

    @property
    def servers(self) -> int:
        return self.spec.gpus * self.spec.batch_slots

    def wait_probability(self, rho: float) -> float:
        """Erlang C at utilization `rho` (memoised on a 1e-3 grid)."""
        key = int(min(rho, _RHO_MAX) * 1000)
        found = self._erlang.get(key)
        if found is None:
            found = self._erlang[key] = erlang_c(self.servers, self.servers * key / 1000)
        return found

    def tail_rate(self, rho: float) -> float:
        """Rate of the exponential wait of those who wait: c·μ·(1−ρ), per second."""
        mu = (self.capacity / self.servers) / self.mean_work
        return self.servers * mu * max(1.0 - min(rho, _RHO_MAX), 1.0 - _RHO_MAX)

    def step(
        self,
        dt: float,
        prompt: FloatArray,
        output: FloatArray,
        rng: np.random.Generator,
    ) -> StepResult:
        """Serve one step of `dt` seconds in which these requests were admitted."""
        capacity = self.capacity
        work = prompt + output
        offered = float(work.sum()) / (capacity * dt)
        count = len(work)
        # FIFO: a request first waits for the backlog in front of it, then for half the
        # excess of its own step on average.
        excess = max(0.0, float(work.sum()) - capacity * dt)
        fluid = (self.backlog + 0.5 * excess) / capacity
        timed_out = np.full(count, fluid > self.spec.timeout_seconds)
        self.load += (offered - self.load) * (1.0 - math.exp(-dt / SMOOTHING_SECONDS))
        probability = self.wait_probability(self.load)
        waits = np.where(
            rng.random(count) < probability,
            rng.exponential(1.0 / self.tail_rate(self.load), count),
            0.0,
        )
        ttft = fluid + waits + prompt / self.spec.prefill_tokens_per_second
        timed_out |= ttft > self.spec.timeout_seconds
        served_in = float(work[~timed_out].sum())
        total = self.backlog + served_in
        served = min(total, capacity * dt)
        self.backlog = total - served
        utilization = served / (capacity * dt)
        tpot = (1.0 + self.spec.decode_slowdown * utilization) / self.spec.decode_tokens_per_second
        e2e = ttft + output * tpot
        return StepResult(utilization, offered, self.backlog, ttft, e2e, timed_out)
