"""`governor backtest` against a real Prometheus holding the policy tests' signals as
backfilled history: it fires (and writes) exactly when policies/*_test.yaml expects.

One documented difference: in a policy test a missing sample (`_`) is untrustworthy at
once; in Prometheus the last sample stays readable and is judged stale only once it is older
than the signal's `stale_after` (as the live controller judges it). So every expectation of
a case whose data stops comes exactly `stale_after` later in the backtest — for a
ThrottlePolicy. An AdaptiveLimit keeps stepping on that last value until it is stale, so its
missing-data case cannot be compared by a shift and is left to the policy test."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from controller.cli import app
from controller.policy.baselines import Baselines
from controller.policy.loader import check_files
from controller.policy.testing import PolicyTestFile, read_test_file
from controller.signals.prometheus import PrometheusSource
from controller.sim.backtest import backtest
from tests.sim.conftest import POLICIES
from tests.support.prometheus import PrometheusServer, Series, backfill, openmetrics
from tests.support.redis import RedisServer, free_port

DAY = 86400.0
# Both saturation policies read vLLM's KV-cache usage plus its queue as a share of the batch:
# backfilled with nothing waiting, the signal is the KV-cache usage; the in-flight policy's
# count is the running batch.
TESTS = {"gpu-saturation_test.yaml": 0, "global-inflight-by-gpu_test.yaml": 10}
STALE_AFTER = 60.0  # both policies' saturation signal
EARLY = 5  # intervals of a counter's history before a case: a 2m rate's window at 30 s, and one


def _spec(name: str) -> PolicyTestFile:
    spec, errors = read_test_file(POLICIES / name)
    assert spec is not None, errors
    return spec


def _series(
    signal: str,
    values: list[float | None],
    start: float,
    interval: float,
    case: str,
    in_flight: list[float | None] | None = None,
) -> list[Series]:
    """A test's signal as the series its query reads: vLLM's KV cache in use beside an empty
    queue (the occupancy is the KV share) and a running batch of the case's `in_flight`
    requests (none when the case has no such signal: then nobody is counted in flight, and no
    capacity is estimated, as in the policy test where the signal is absent). `in_flight`
    itself is read from that running batch, so it has no series of its own; `admitted_rps`
    is the gateway's counter of admitted requests (from EARLY intervals early at the first
    rate, so that the policy's 2m `rate` has a whole window of samples from the case's start).
    `ttft_p99` (a quantile of vLLM's TTFT histogram) is not backfilled: the case that reads it
    has a gap, so it is left to the policy test, and without it the others keep their wait."""
    if signal in ("in_flight", "ttft_p99"):
        return []
    if signal == "admitted_rps":  # the gateway's counter of admitted requests, `rate` of it
        first = next((v for v in values if v is not None), 0.0)
        samples = [
            (start - k * interval, first * interval * (EARLY - k)) for k in range(EARLY, 0, -1)
        ]
        total = samples[-1][1]
        for i, value in enumerate(values):
            if value is not None:
                total += value * interval
                samples.append((start + i * interval, total))
        return [Series("gateway_requests_total", {"outcome": "allow", "case": case}, samples)]
    times = [start + i * interval for i, v in enumerate(values) if v is not None]
    kv = [v for v in values if v is not None]
    running = [float(v or 0.0) for v in (in_flight or [])]
    batch = [running[i] if i < len(running) else 0.0 for i, v in enumerate(values) if v is not None]
    labels = {"model_name": "llama", "engine": "0", "case": case}
    return [
        Series(metric, labels, list(zip(times, column, strict=True)))
        for metric, column in (
            ("vllm:kv_cache_usage_perc", kv),
            ("vllm:num_requests_waiting", [0.0] * len(kv)),
            ("vllm:num_requests_running", batch),
        )
    ]


def _origin(base: float, name: str, case: int) -> float:
    return base + (TESTS[name] + case) * DAY


@pytest.fixture(scope="module")
def base() -> float:
    """Day 0 of the history: whole hours, two weeks ago (inside the 30-day retention)."""
    return float(int(time.time() // 3600 * 3600) - 14 * int(DAY))


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, base: float) -> Iterator[str]:
    """Every case's vLLM series, one case per simulated day, backfilled with promtool."""
    series = []
    for name in TESTS:
        spec = _spec(name)
        for number, case in enumerate(spec.tests):
            start = _origin(base, name, number)
            in_flight = case.signals.get("in_flight")
            assert in_flight is None or isinstance(in_flight, list)
            for signal, values in case.signals.items():
                assert isinstance(values, list)
                case_name = f"{name}-{number}"
                series += _series(signal, values, start, spec.interval, case_name, in_flight)
    # One runaway tenant for a day before day 0 (the tenant-registry tests).
    spend = [(base - DAY + i * 60.0, 5.0) for i in range(60)]
    series.append(Series("tenant_spend", {"tenant": "acme"}, spend))
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus-backtest"))
    backfill(server.data_dir, openmetrics(series))
    server.start()
    yield server.url
    server.stop()


@pytest.mark.parametrize("name", list(TESTS))
def test_backtest_fires_when_the_policy_test_expects(
    name: str, prometheus: str, base: float
) -> None:
    spec = _spec(name)
    policies, errors = check_files([POLICIES / f for f in spec.policy_files], POLICIES)
    assert policies is not None, errors
    source = PrometheusSource.from_url(prometheus)
    for number, case in enumerate(spec.tests):
        start = _origin(base, name, number)
        gaps = any(isinstance(v, list) and None in v for v in case.signals.values())
        shift = STALE_AFTER if gaps else 0.0
        if shift and policies.adaptives:
            continue
        last = max(e.at for e in case.expect) + shift
        result = backtest(source, policies, start, start + last, spec.interval, case.tenants)
        assert result.errors == []
        baselines = Baselines(policies, case.tenants)
        for expectation in case.expect:
            at = expectation.at + shift
            index = round(at / spec.interval)
            assert result.times[index] == pytest.approx(start + at)
            for address, expected in expectation.limits.items():
                found = result.limits[index].get(address, baselines.value(address))
                assert found == pytest.approx(expected), f"{case.name} at {at}s: {address}"
            if expectation.active is not None:
                active = sorted(ref.split("/", 1)[1] for ref in result.active[index])
                assert active == sorted(expectation.active), f"{case.name} at {at}s"
        # Firing times: the engaged transitions are where the test's `active` flips.
        engaged = [f.at - start for f in result.firings if f.event == "engaged"]
        for expectation in case.expect:
            if expectation.active:
                assert any(t <= expectation.at + shift for t in engaged), case.name


def test_backtest_cli_is_labelled_open_loop(prometheus: str, base: float, tmp_path: Path) -> None:
    start = _origin(base, "gpu-saturation_test.yaml", 0)
    chosen = tmp_path / "policies"  # without the business-hours schedule: any weekday works
    chosen.mkdir()
    for name in ("plans.yaml", "limits.yaml", "gpu-saturation.yaml"):
        (chosen / name).write_text((POLICIES / name).read_text())
    result = CliRunner().invoke(
        app,
        ["backtest", "--from", str(start), "--to", str(start + 300), "--policies",
         str(chosen), "--prometheus", prometheus, "--out", str(tmp_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["open_loop"] is True
    engaged = [f for f in payload["firings"] if f["policy"] == "ThrottlePolicy/gpu-saturation"]
    assert engaged[0]["event"] == "engaged"
    assert engaged[0]["at"] == pytest.approx(start + 270)  # hot from 2m30s, `for: 2m`
    writes = {w["address"]: w for w in payload["writes"] if w["at"] == start + 270}
    assert writes["plan/free/requests_per_minute"]["new"] == 5
    assert Path(payload["png"]).is_file()
    human = CliRunner().invoke(
        app,
        ["backtest", "--from", str(start), "--to", str(start + 300), "--policies",
         str(chosen), "--prometheus", prometheus, "--out", str(tmp_path)],
    )  # fmt: skip
    assert "OPEN-LOOP backtest" in human.stdout


RUNAWAY = """\
apiVersion: governor/v1
kind: Plan
metadata: {name: free}
spec:
  limits: {requests_per_minute: 10}
---
apiVersion: governor/v1
kind: Plan
metadata: {name: paid}
spec:
  limits: {requests_per_minute: 100, tokens_per_minute: 10000}
---
apiVersion: governor/v1
kind: Limits
metadata: {name: global}
spec:
  default_plan: free
  global: {requests_per_second: 100}
---
apiVersion: governor/v1
kind: ThrottlePolicy
metadata: {name: runaway}
spec:
  per: tenant
  signals:
    spend: {query: 'max by (tenant) (tenant_spend)', stale_after: 5m}
  when: spend > 1
  actions: [{target: tenant/$tenant/tokens_per_minute, scale: 0.25}]
"""


def _backtest(tmp_path: Path, start: float, *args: str, redis_url: str | None = None) -> Result:
    """The runaway policies backtested over ten minutes from `start` ."""
    chosen = tmp_path / "runaway"
    chosen.mkdir(exist_ok=True)
    (chosen / "policies.yaml").write_text(RUNAWAY)
    return CliRunner().invoke(
        app,
        ["backtest", "--from", str(start), "--to", str(start + 600), "--policies", str(chosen),
         "--out", str(tmp_path / "out"), *args],
        env={"GOVERNOR_REDIS__URL": redis_url},
    )  # fmt: skip


def test_without_a_registry_the_engine_says_why_nothing_was_written(
    prometheus: str, base: float, tmp_path: Path
) -> None:
    result = _backtest(tmp_path, base - DAY - 300, "--prometheus", prometheus, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [(f["key"], f["event"]) for f in payload["firings"]] == [("acme", "engaged")]
    assert [w for w in payload["writes"] if w["address"].startswith("tenant/")] == []
    notes = "\n".join(payload["notes"])
    assert "tenant registry: none, so every tenant is on the default plan" in notes
    assert "cannot scale tenant/acme/tokens_per_minute: it has no baseline" in notes
    human = _backtest(tmp_path, base - DAY - 300, "--prometheus", prometheus)
    assert "note: " in human.stdout
    assert "it has no baseline" in human.stdout


def test_the_tenant_registry_is_read_from_redis(
    prometheus: str, base: float, tmp_path: Path, redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    registered = CliRunner().invoke(
        app, ["tenants", "set", "acme", "paid"], env={"GOVERNOR_REDIS__URL": redis_server.url}
    )
    assert registered.exit_code == 0, registered.output
    result = _backtest(
        tmp_path, base - DAY - 300, "--prometheus", prometheus, "--json", redis_url=redis_server.url
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    (write,) = [w for w in payload["writes"] if w["address"] == "tenant/acme/tokens_per_minute"]
    assert write["new"] == 2500  # a quarter of the paid plan's 10000
    assert write["policy"] == "ThrottlePolicy/runaway"
    assert "tenant registry: 1 tenants from Redis, 0 from --tenant" in payload["notes"]
    # --tenant goes on top of Redis's registry.
    free = _backtest(tmp_path, base - DAY - 300, "--prometheus", prometheus, "--json",
                     "--tenant", "acme=free", redis_url=redis_server.url)  # fmt: skip
    assert [w for w in json.loads(free.stdout)["writes"] if "acme" in w["address"]] == []


def test_an_unreachable_prometheus_exits_1_with_one_line(base: float, tmp_path: Path) -> None:
    url = f"http://user:secret@127.0.0.1:{free_port()}"
    result = _backtest(tmp_path, base - DAY - 300, "--prometheus", url)
    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: Prometheus at http://127.0.0.1:{url.rsplit(':', 1)[1]} ")
    assert "Connection refused" in line
    assert "secret" not in result.output
    assert not (tmp_path / "out").exists()  # no empty PNG


def test_an_unreachable_redis_exits_1_with_one_line(
    prometheus: str, base: float, tmp_path: Path
) -> None:
    down = f"redis://127.0.0.1:{free_port()}/0"
    result = _backtest(tmp_path, base - DAY - 300, "--prometheus", prometheus, redis_url=down)
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: Redis at 127.0.0.1:")
    # Its first command: the key contract, read before anything else (never written over).
    assert "read the key contract failed" in line
    assert "Connection refused" in line
    assert not (tmp_path / "out").exists()


def test_a_range_without_data_says_every_signal_was_empty(
    prometheus: str, base: float, tmp_path: Path
) -> None:
    result = _backtest(tmp_path, base - 5 * DAY, "--prometheus", prometheus)
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: every signal was empty from ")
    assert "1 policy queries" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prometheus", "prometheus:9090"), "needs an http:// or https:// scheme"),
        (("--prometheus", "http://127.0.0.1:1", "--tenant", "acme"), "give TENANT=PLAN"),
    ],
)
def test_bad_input_exits_2(
    base: float, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    result = _backtest(tmp_path, base, *args)
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(
    ("start", "end", "step", "message"),
    [
        ("nan", "+600", "30s", "'nan' is not a time: unix seconds from 0 to 253402300799"),
        ("+0", "inf", "30s", "'inf' is not a time"),
        ("+0", "1e300", "30s", "'1e300' is not a time"),
        ("-1e300", "+0", "30s", "'-1e300' is not a time"),
        ("+0", "+86400", "1s", "1d from --from to --to every 1s is 86,401 evaluations; "
         "Prometheus answers at most 11,000 points per query: use --step 8s or more"),
        ("+0", "+600", "1ms", "is 600,001 evaluations"),
    ],
)  # fmt: skip
def test_a_window_prometheus_cannot_answer_exits_2_naming_the_input(
    prometheus: str, base: float, tmp_path: Path, start: str, end: str, step: str, message: str
) -> None:
    # nan ended in "cannot convert float NaN to integer", inf and 1e300 in an OverflowError
    # traceback (exit 1, read as "Prometheus lacks it"), and a step past Prometheus' 11,000
    # points stepped the engine through every point of refused queries: 800 MB in 25 s for
    # --step 1ms over four hours, and counting.
    def moment(text: str) -> str:
        return str(base - DAY + float(text[1:])) if text.startswith("+") else text

    chosen = tmp_path / "runaway"
    chosen.mkdir()
    (chosen / "policies.yaml").write_text(RUNAWAY)
    started = time.monotonic()
    result = CliRunner().invoke(
        app,
        ["backtest", "--from", moment(start), "--to", moment(end), "--step", step,
         "--policies", str(chosen), "--prometheus", prometheus, "--out", str(tmp_path / "out")],
    )  # fmt: skip

    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.replace("│", "").split())
    assert time.monotonic() - started < 10
    assert not (tmp_path / "out").exists()
