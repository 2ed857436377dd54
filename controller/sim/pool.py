"""A GPU pool that behaves like vLLM: continuous batching behind a FCFS queue, chunked prefill
much cheaper per token than decode, a KV cache in tokens with preemption (docs/simulator.md).

Requests stay in the pool and are stepped through it in engine steps of
`engine_step_seconds`: each step the waiting queue's head joins the running batch while
batch slots (`max_num_seqs`), KV cache and token budget remain; each engine iteration decodes
a token of every decoding request and fills the rest of its token budget with prefill chunks,
first come first served (vLLM V1's scheduler with chunked prefill). A request holds KV for its
prompt and its generated tokens; when the cache overflows the newest running requests are
preempted and recomputed from the queue's front.
TTFT is set when the first token is produced; a client whose first token has not come after
`timeout_seconds` gives up. Everything within a step is vectorised over the requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from controller.model import FloatArray
from controller.sim.queue import Queue, Rows
from controller.sim.scenario import Pool

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# vllm:time_to_first_token_seconds' buckets (vllm/v1/metrics/loggers.py).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
_BUCKET_EDGES = np.array([-np.inf, *TTFT_BUCKETS, np.inf])
_EPS = 1e-9

# One column a request, one row a field (each field contiguous: the step reads fields).
# UNCOMPUTED: prompt tokens still to compute (a preempted request recomputes its prompt and what it
# generated); KV: tokens it holds in the cache; FIRST: 1 once its first token came (its TTFT is
# recorded; the client no longer times out). Tags are exact in float64 up to 2^53.
TAG, ARRIVAL, PROMPT, OUTPUT, UNCOMPUTED, GEN, KV, FIRST = range(8)


def _empty() -> Rows:
    return np.empty((8, 0))


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one scenario step did: the pool's use and the requests it resolved."""

    utilization: float  # compute used ÷ compute of the GPUs up (the work share)
    busy: float  # share of GPU-time a kernel ran: DCGM_FI_DEV_GPU_UTIL / 100
    first: IntArray  # tags whose first token came in this step
    ttft: FloatArray  # their TTFT, seconds (queue wait + prefill)
    gave_up: IntArray  # tags whose client timed out before its first token
    gave_up_at: FloatArray  # when, elapsed seconds
    finished: IntArray  # tags whose last token came
    finished_at: FloatArray  # when, elapsed seconds


@dataclass
class Counters:
    """vLLM's counters and TTFT histogram, cumulative since the pool started."""

    prompt_tokens: float = 0.0
    generation_tokens: float = 0.0
    preemptions: float = 0.0
    ttft_sum: float = 0.0
    ttft_counts: FloatArray = field(default_factory=lambda: np.zeros(len(TTFT_BUCKETS) + 1))


@dataclass
class _Resolved:
    """The tags one step resolved, gathered over its engine steps."""

    first: list[IntArray] = field(default_factory=list)
    ttft: list[FloatArray] = field(default_factory=list)
    gave_up: list[IntArray] = field(default_factory=list)
    gave_up_at: list[FloatArray] = field(default_factory=list)
    finished: list[IntArray] = field(default_factory=list)
    finished_at: list[FloatArray] = field(default_factory=list)

    def result(self, utilization: float, busy: float) -> StepResult:
        return StepResult(
            utilization,
            busy,
            _ints(self.first),
            _floats(self.ttft),
            _ints(self.gave_up),
            _floats(self.gave_up_at),
            _ints(self.finished),
            _floats(self.finished_at),
        )


def _ints(parts: list[IntArray]) -> IntArray:
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)


def _floats(parts: list[FloatArray]) -> FloatArray:
    return np.concatenate(parts) if parts else np.empty(0)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one engine step can do for the running batch."""

    decoding: BoolArray  # past their prefill
    chunk: FloatArray  # prompt tokens each could prefill in the step (0 when decoding)
    start: FloatArray  # when each can start in the step (its arrival, at the earliest)
    iterations: float  # tokens each decoding request gets
    prefill: float  # prompt tokens prefilled, first come first served
    stream: float  # prompt tokens the step could prefill at most


class PoolModel:
    """One pool's engine state across steps: the waiting queue and the running batch."""

    def __init__(self, spec: Pool, mean_prompt: float, mean_output: float) -> None:
        self.spec = spec
        self.mean_prompt, self.mean_output = mean_prompt, mean_output
        # `capacity_tokens_per_second` is in the gateway's unit (prompt + output tokens/s) at
        # this pool's own mix; the engine counts GPU time in decode tokens, a prompt token
        # costing 1/ratio of one: the same GPU-seconds, so a scenario's load keeps its meaning.
        tokens = max(mean_prompt + mean_output, _EPS)
        cost = mean_output + mean_prompt / spec.prefill_decode_ratio
        self.compute = spec.capacity_tokens_per_second * max(cost, _EPS) / tokens
        self.scale = 1.0  # share of the pool's GPUs up (a `capacity` event: a node down)
        self.queue = Queue(8)  # queue order (preempted requests at the front)
        self.running = _empty()  # admission order (the newest last: preempted first)
        self.counters = Counters()

    # --- capacity of the GPUs up --------------------------------------------------------------

    @property
    def capacity(self) -> float:
        """Tokens/s (prompt + output, at the pool's mix) of the GPUs up now."""
        return self.spec.capacity_tokens_per_second * self.scale

    @property
    def scale(self) -> float:
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        """The GPUs up set the batch's slots, the cache and the compute (read every step)."""
        self._scale = value
        spec = self.spec
        self.gpus_up = max(spec.gpus * value, _EPS)
        self.max_seqs = max(1, round(spec.batch_slots * self.gpus_up))  # vLLM's max_num_seqs
        self.kv_capacity = spec.kv_cache_tokens * self.gpus_up  # KV-cache tokens
        self.power = self.compute * value  # decode-token equivalents a second
        self.token_budget = spec.max_num_batched_tokens * self.gpus_up  # an iteration's

    # --- what vLLM exports --------------------------------------------------------------------

    @property
    def waiting(self) -> Rows:
        """The waiting requests, front first."""
        return self.queue.rows

    @property
    def kv_usage(self) -> float:
        """vllm:kv_cache_usage_perc: the share of the cache in use, 0–1."""
        return min(1.0, float(self.running[KV].sum()) / self.kv_capacity)

    @property
    def backlog(self) -> float:
        """Tokens (prompt + output) of the waiting requests still to serve."""
        w = self.waiting
        return float(w[UNCOMPUTED].sum() + (w[OUTPUT] - w[GEN]).sum())

    @property
    def in_flight(self) -> int:
        return int(self.running.shape[1] + self.waiting.shape[1])

    # --- stepping -----------------------------------------------------------------------------

    def step(
        self,
        elapsed: float,
        dt: float,
        tags: IntArray,
        arrival: FloatArray,
        prompt: FloatArray,
        output: FloatArray,
    ) -> StepResult:
        """Serve `dt` seconds from `elapsed`, in which these requests arrived (elapsed
        seconds); resolve the first tokens, give-ups and ends that fall in it."""
        count = max(1, round(dt / min(self.spec.engine_step_seconds, dt)))
        h = dt / count
        order = np.argsort(arrival, kind="stable")
        new = np.zeros((8, len(order)))
        # At least one token each: vLLM prefills at least one prompt token (BOS) before the
        # first output token, and a trace row of 0 (BurstGPT's failures) still ran.
        new[TAG], new[ARRIVAL] = tags[order], arrival[order]
        new[PROMPT] = np.maximum(prompt[order], 1.0)
        new[OUTPUT], new[UNCOMPUTED] = np.maximum(output[order], 1.0), new[PROMPT]
        cuts = np.searchsorted(new[ARRIVAL], elapsed + h * np.arange(1, count), side="left")
        resolved = _Resolved()
        used = busy = 0.0
        for k, batch in enumerate(np.split(new, cuts, axis=1)):
            if batch.shape[1]:
                self.queue.push(batch)
            u, b = self._engine_step(elapsed + k * h, h, resolved)
            used += u
            busy += b
        result = resolved.result(used / count, busy / count)
        c = self.counters
        c.ttft_sum += float(result.ttft.sum())
        c.ttft_counts += np.histogram(result.ttft, _BUCKET_EDGES)[0]
        return result

    def _engine_step(self, t0: float, h: float, resolved: _Resolved) -> tuple[float, float]:
        """One engine step: admit, compute, finish, preempt, time out. Returns the work share
        and the busy share of the step."""
        self._admit(t0, h, resolved)
        used, busy, ends = self._compute(t0, h, resolved)
        self._finish(ends, resolved)
        self._preempt()
        self._time_out(t0 + h, resolved)
        return used, busy

    def _admit(self, t0: float, h: float, resolved: _Resolved) -> None:
        """The queue's head joins the batch while slots, KV cache for its prompt and the
        step's compute remain (vLLM V1 schedules the running requests first and the waiting
        only in the token budget they leave; FCFS: the first that does not fit stops the
        rest)."""
        waiting, running = self.waiting, self.running
        slots = self.max_seqs - running.shape[1]
        if not waiting.shape[1] or slots <= 0:
            return
        free = self.kv_capacity - float(running[KV].sum())
        todo = waiting[UNCOMPUTED, :slots]
        need = np.cumsum(todo + 1.0)
        take = int(np.searchsorted(need, free, side="right"))
        if take == 0 and not running.shape[1] and need[0] > self.kv_capacity:
            # Larger than the whole cache: vLLM refuses it (beyond max_model_len); the
            # client sees a failure, counted as a give-up.
            resolved.gave_up.append(waiting[TAG, :1].astype(np.int64))
            resolved.gave_up_at.append(np.array([t0]))
            self.queue.pop(1)
            return
        # A request joins if its prefill can start in the compute the batch leaves.
        plan = self._plan(t0, h)
        room = plan.stream - float(plan.chunk.sum())
        take = min(take, int(np.searchsorted(need - todo - 1.0, room, side="left")))
        if take:
            self.running = np.concatenate([running, waiting[:, :take]], axis=1)
            self.queue.pop(take)

    def _speed(self, n: int) -> float:
        """Decode tokens/s of one sequence in a batch of `n`: slower as the batch fills; but
        a full batch can always use the pool's compute (a pool stated faster than its slots
        decode at the idle speed runs a smaller model)."""
        spec = self.spec
        fill = min(1.0, n / self.max_seqs)
        idle = spec.decode_tokens_per_second / (1.0 + spec.decode_slowdown * fill)
        return max(idle, self.power / self.max_seqs)

    def _plan(self, t0: float, h: float) -> _Plan:
        """The step's iterations: each decodes a token of every decoding request and
        prefills up to the token budget's rest (chunked prefill); as many as the time allows
        at the batch's speed and the compute allows at their cost."""
        r, spec = self.running, self.spec
        ratio = spec.prefill_decode_ratio
        decoding = r[UNCOMPUTED] <= 0.0
        decoders = int(np.count_nonzero(decoding))
        # Each prefill at most at one GPU's prefill speed from its arrival.
        start = np.maximum(t0, r[ARRIVAL])
        reach = spec.prefill_tokens_per_second * np.maximum(t0 + h - start, 0.0)
        chunk = np.where(decoding, 0.0, np.minimum(r[UNCOMPUTED], reach))
        pending = float(chunk.sum())
        budget = self.power * h  # decode-token equivalents
        most = h * self._speed(r.shape[1])
        beside = max(self.token_budget - decoders, 0.0)
        full = min(most, budget / max(decoders + beside / ratio, _EPS))
        stream = full * beside  # prompt tokens the step can prefill at most
        if pending >= stream:
            return _Plan(decoding, chunk, start, full, stream, stream)
        # The prefills end early: the rest of the step decodes only.
        iterations = min(most, (budget - pending / ratio) / max(decoders, _EPS))
        return _Plan(decoding, chunk, start, iterations, pending, stream)

    def _compute(self, t0: float, h: float, resolved: _Resolved) -> tuple[float, float, FloatArray]:
        """The step's compute on the running batch. Returns the work share, the busy share
        and when each running request would end."""
        r = self.running
        n = r.shape[1]
        if not n:
            return 0.0, 0.0, np.empty(0)
        spec = self.spec
        plan = self._plan(t0, h)
        decoding, chunk = plan.decoding, plan.chunk
        left = r[OUTPUT] - r[GEN]
        want = np.where(decoding, np.minimum(left, plan.iterations), 0.0)
        cum = np.cumsum(chunk)  # FCFS: in admission order
        got = np.clip(plan.prefill - (cum - chunk), 0.0, chunk)
        done = ~decoding & (got >= r[UNCOMPUTED] - _EPS)
        # When a prefill ends: where the prefill stream reaches it, not before its own
        # prompt at one GPU's speed.
        at = np.maximum(
            t0 + h * cum / max(plan.stream, _EPS),
            plan.start + r[UNCOMPUTED] / spec.prefill_tokens_per_second,
        )
        fresh = done & (r[FIRST] == 0.0)
        # A first token after the client's timeout comes too late: it gave up (below).
        late = fresh & (at > r[ARRIVAL] + spec.timeout_seconds)
        self._first_tokens(r, fresh & ~late, at, resolved)
        ends = np.where(done, at, t0 + h * left / max(plan.iterations, _EPS))
        tokens = want + done  # the prefill's iteration yields a token too
        r[UNCOMPUTED] -= got
        r[GEN] += tokens
        r[KV] += got + tokens
        r[FIRST] = np.maximum(r[FIRST], done & ~late)
        self.counters.generation_tokens += float(tokens.sum())
        budget = self.power * h
        used = float(want.sum()) + float(got.sum()) / spec.prefill_decode_ratio
        # DCGM: a GPU with a running decode batch runs kernels all the step, whatever the
        # batch's size; GPUs only prefilling are busy for the prefill's share of their time.
        active = min(n, self.gpus_up)
        running = 1.0 if decoding.any() else min(1.0, used * self.gpus_up / (budget * active))
        return used / budget, active / self.gpus_up * running, ends

    def _first_tokens(self, r: Rows, fresh: BoolArray, at: FloatArray, resolved: _Resolved) -> None:
        if not fresh.any():
            return
        resolved.first.append(r[TAG, fresh].astype(np.int64))
        resolved.ttft.append(at[fresh] - r[ARRIVAL, fresh])
        self.counters.prompt_tokens += float(r[PROMPT, fresh].sum())

    def _finish(self, ends: FloatArray, resolved: _Resolved) -> None:
        r = self.running
        if not r.shape[1]:
            return
        done = r[GEN] >= r[OUTPUT] - _EPS
        if done.any():
            resolved.finished.append(r[TAG, done].astype(np.int64))
            resolved.finished_at.append(ends[done])
            self.running = r[:, ~done]

    def _preempt(self) -> None:
        """Past the cache, the newest running requests go back to the queue's front, their
        KV freed, to recompute prompt and output so far (vLLM V1's recompute preemption)."""
        r = self.running
        if float(r[KV].sum()) <= self.kv_capacity + _EPS:
            return
        cut = int(np.argmax(np.cumsum(r[KV]) > self.kv_capacity + _EPS))
        out = r[:, cut:].copy()
        out[UNCOMPUTED] = out[PROMPT] + out[GEN]
        out[KV] = 0.0
        self.running = r[:, :cut]
        self.queue.push_front(out)
        self.counters.preemptions += out.shape[1]

    def _time_out(self, now: float, resolved: _Resolved) -> None:
        """Clients without a first token after `timeout_seconds` give up, wherever they
        are; a running one frees its slot and KV (vLLM aborts it)."""
        limit = self.spec.timeout_seconds
        for rows in (self.waiting, self.running):
            if not rows.shape[1] or rows[ARRIVAL].min() + limit > now:
                continue
            gone = (rows[FIRST] == 0.0) & (rows[ARRIVAL] + limit <= now)
            if gone.any():
                resolved.gave_up.append(rows[TAG, gone].astype(np.int64))
                resolved.gave_up_at.append(rows[ARRIVAL, gone] + limit)
                if rows is self.running:
                    self.running = rows[:, ~gone]
                else:
                    self.queue.drop(gone)
