"""`governor config show` from GOVERNOR_* variables: secrets masked, bad values named."""

from __future__ import annotations

import json
import os

import pytest
from pydantic import BaseModel
from typer.testing import CliRunner

from controller.cli import app
from controller.gateway.prices import PriceTable
from controller.settings import Settings

MASK = "**********"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the variables a test sets: none from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith("GOVERNOR_"):
            monkeypatch.delenv(name)


def show(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["config", "show", *args])
    return result.exit_code, result.stdout, result.stderr


SECRETS = {
    "GOVERNOR_REDIS__URL": "redis://:secretpw@h:1/0",
    "GOVERNOR_REDIS__PASSWORD": "redispass-42",
    "GOVERNOR_PROMETHEUS__BEARER_TOKEN": "tok-3141",
    "GOVERNOR_PROMETHEUS__PASSWORD": "prompass-2718",
    "GOVERNOR_PROMETHEUS__HEADERS": '{"Authorization": "Basic aGVhZGVyLXNlY3JldA=="}',
}


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_secrets_from_the_environment_are_masked(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)

    code, stdout, stderr = show(*(["--json"] if as_json else []))

    assert code == 0, stderr
    for secret in SECRETS.values():
        assert secret not in stdout + stderr
    assert "aGVhZGVyLXNlY3JldA" not in stdout + stderr  # header values may hold credentials
    assert "secretpw" not in stdout + stderr
    if as_json:
        data = json.loads(stdout)
        assert data["redis"]["url"] == f"redis://:{MASK}@h:1/0"
        assert data["redis"]["password"] == MASK
        assert data["prometheus"]["bearer_token"] == MASK
    else:
        assert f'  url: "redis://:{MASK}@h:1/0"' in stdout.splitlines()


URLS = {
    "GOVERNOR_PROMETHEUS__URL": (
        "https://reader:prom%40pw-77@prom.example:9443/prom",
        f"https://reader:{MASK}@prom.example:9443/prom",
    ),
    "GOVERNOR_REDIS__URL": (
        "redis+sentinel://app:sentpw-11@s-0:26380,s-1/mymaster/2?sentinel_password=sp-22",
        f"redis+sentinel://app:{MASK}@s-0:26380,s-1/mymaster/2?sentinel_password={MASK}",
    ),
    "GOVERNOR_CONTROLLER__SINKS": (
        "redis,rediss://:sinkpw-33@10.0.0.5:6380/2,redis://cache.internal:6379/3,"
        "redis://lonepw-44@10.0.0.6:6379/0",  # a password written as the user: masked whole
        [
            "redis",
            f"rediss://:{MASK}@10.0.0.5:6380/2",
            "redis://cache.internal:6379/3",
            f"redis://{MASK}@10.0.0.6:6379/0",
        ],
    ),
}


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_exactly_the_secret_of_every_url_is_masked(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    for name, (value, _) in URLS.items():
        monkeypatch.setenv(name, value)

    code, stdout, stderr = show(*(["--json"] if as_json else []))

    assert code == 0, stderr
    for secret in ("prom%40pw-77", "prom@pw-77", "sentpw-11", "sp-22", "sinkpw-33", "lonepw-44"):
        assert secret not in stdout + stderr
    shown = {
        "GOVERNOR_PROMETHEUS__URL": ("prometheus", "url"),
        "GOVERNOR_REDIS__URL": ("redis", "url"),
        "GOVERNOR_CONTROLLER__SINKS": ("controller", "sinks"),
    }
    for name, (group, key) in shown.items():
        expected = URLS[name][1]
        if as_json:
            assert json.loads(stdout)[group][key] == expected
        else:
            assert f"  {key}: {json.dumps(expected)}" in stdout.splitlines()


def test_a_redis_url_without_a_password_is_shown_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVERNOR_REDIS__URL", "redis://cache.internal:6379/0")

    code, stdout, stderr = show("--json")

    assert code == 0, stderr
    assert json.loads(stdout)["redis"]["url"] == "redis://cache.internal:6379/0"


def test_unset_secrets_show_as_null_and_plain_values_as_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOVERNOR_CONTROLLER__TICK_SECONDS", "2.5")
    monkeypatch.setenv("GOVERNOR_REDIS__KEY_PREFIX", "gov-test")

    code, stdout, _ = show("--json")

    data = json.loads(stdout)
    assert code == 0
    assert data["redis"]["url"] is None
    assert data["controller"]["tick_seconds"] == 2.5
    assert data["redis"]["key_prefix"] == "gov-test"


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_a_bad_value_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    monkeypatch.setenv("GOVERNOR_CONTROLLER__TICK_SECONDS", "-1")

    code, stdout, stderr = show(*(["--json"] if as_json else []))

    assert (code, stdout) == (2, "")
    assert stderr.startswith("error: GOVERNOR_CONTROLLER__TICK_SECONDS: ")
    assert "greater than 0" in stderr


def test_every_bad_variable_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVERNOR_CONTROLLER__TICK_SECONDS", "soon")
    monkeypatch.setenv("GOVERNOR_TELEMETRY__PORT", "70000")
    monkeypatch.setenv("GOVERNOR_REDIS__URL", "redis://:secretpw@h:1/0")

    code, _, stderr = show()

    assert code == 2
    named = sorted(line.split(":")[1].strip() for line in stderr.splitlines())
    assert named == ["GOVERNOR_CONTROLLER__TICK_SECONDS", "GOVERNOR_TELEMETRY__PORT"]
    assert "secretpw" not in stderr


@pytest.mark.parametrize(
    ("variable", "meant"),
    [
        ("GOVERNOR_REDIS__URLL", "GOVERNOR_REDIS__URL"),  # a typo in the field
        ("GOVERNOR_REDISS__URL", "GOVERNOR_REDIS__URL"),  # a typo in the group
        ("GOVERNOR_REDIS_URL", "GOVERNOR_REDIS__URL"),  # one underscore short
        ("governor_controller__tick_secs", "GOVERNOR_CONTROLLER__TICK_SECONDS"),
    ],
)
def test_a_variable_naming_no_setting_exits_2_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, variable: str, meant: str
) -> None:
    monkeypatch.setenv(variable, "redis://:secretpw@h:1/0")

    code, stdout, stderr = show()

    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: {variable} is not a Governor setting")
    assert f"did you mean {meant}?" in stderr
    assert "secretpw" not in stderr


def test_kubernetes_service_links_and_mapping_keys_are_not_mistaken_for_typos(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What Kubernetes injects for a Service named governor (or a subchart's governor-redis),
    # and keys below a mapping setting, which any name may take.
    for name in ("GOVERNOR_SERVICE_HOST", "GOVERNOR_PORT_9100_TCP_PROTO",
                 "GOVERNOR_REDIS_SERVICE_PORT"):  # fmt: skip
        monkeypatch.setenv(name, "10.0.0.1")
    monkeypatch.setenv("GOVERNOR_PRICES__MODELS__MY_MODEL__PROMPT_PER_1K", "0.002")
    monkeypatch.setenv("GOVERNOR_PRICES__MODELS__MY_MODEL__COMPLETION_PER_1K", "0.004")

    code, stdout, stderr = show("--json")

    assert (code, stderr) == (0, "")
    assert "my_model" in json.loads(stdout)["prices"]["models"]


def _float_settings() -> list[str]:
    """The GOVERNOR_* name of every number setting that is a float (NaN and ±Inf parse)."""
    names = []
    for group, field in Settings.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        for name, inner in model.model_fields.items():
            if inner.annotation in (float, float | None):
                names.append(f"GOVERNOR_{group.upper()}__{name.upper()}")
    return names


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "Infinity"])
@pytest.mark.parametrize("variable", _float_settings())
def test_a_number_setting_that_is_not_finite_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    # inf passed `gt=0` and reached the clients: a tick or lease that never ends, a socket
    # timeout redis-py turns into an OverflowError traceback.
    monkeypatch.setenv(variable, value)

    code, stdout, stderr = show()

    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: {variable}: ")
    assert "finite number" in stderr


def test_an_infinite_redis_timeout_is_refused_before_any_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOVERNOR_REDIS__URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS", "inf")

    result = CliRunner().invoke(app, ["override", "list"])

    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert result.stderr.strip().splitlines() == [
        "error: GOVERNOR_REDIS__SOCKET_TIMEOUT_SECONDS: Input should be a finite number"
    ]


@pytest.mark.parametrize(
    "variable",
    [
        "GOVERNOR_PROMETHEUS__BEARER_TOKEN",
        "GOVERNOR_KONG__ADMIN_TOKEN",
        "GOVERNOR_GATEWAY__UPSTREAM_API_KEY",
        "GOVERNOR_GATEWAY__METRICS_TOKEN",
    ],
)
@pytest.mark.parametrize("value", ["tok-S3CRET\n", "tok-S3CRET\r\n", " tok-S3CRET", "tok-S3CRET\t"])
def test_a_token_sent_as_a_header_that_no_header_can_carry_exits_2_unshown(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)

    code, stdout, stderr = show()

    assert (code, stdout) == (2, "")
    assert stderr.startswith(f"error: {variable}: Value error, the value (not shown) holds ")
    assert "S3CRET" not in stderr


@pytest.mark.parametrize(
    "command", [("config", "show"), ("run", "--once", "--dry-run", "--policies", "policies")]
)
def test_an_unknown_log_level_exits_2_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    # config show accepted it, and `governor run` ended in a ValueError traceback.
    monkeypatch.setenv("GOVERNOR_LOG_LEVEL", "verbose")

    result = CliRunner().invoke(app, list(command))

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "error: GOVERNOR_LOG_LEVEL: Value error, 'verbose' is not one of debug, info, warning, "
        "error"
    ]


def test_a_log_level_is_read_in_any_case(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVERNOR_LOG_LEVEL", "Warning")

    code, stdout, _ = show("--json")

    assert code == 0
    assert json.loads(stdout)["log_level"] == "warning"


@pytest.mark.parametrize("value", ["0.001", "0.49", "1e-9"])
def test_a_tick_below_the_floor_exits_2_naming_the_variable_and_its_fix(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    # Only `gt=0` bounded it: a 1 ms tick queried Prometheus and wrote Redis in a loop.
    monkeypatch.setenv("GOVERNOR_CONTROLLER__TICK_SECONDS", value)

    code, stdout, stderr = show()

    assert (code, stdout) == (2, "")
    assert stderr.startswith("error: GOVERNOR_CONTROLLER__TICK_SECONDS: ")
    assert f"a tick of {float(value):g} s is below the 0.5 s floor" in stderr
    assert "set it to 0.5 or more" in stderr


def test_a_tick_at_the_floor_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOVERNOR_CONTROLLER__TICK_SECONDS", "0.5")

    code, stdout, _ = show("--json")

    assert code == 0
    assert json.loads(stdout)["controller"]["tick_seconds"] == 0.5


def test_two_prices_for_one_model_in_two_cases_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Models are priced as they are limited, without regard to case: which of two prices
    # for GPT-4 and gpt-4 won would depend on the table's order.
    prices = {"gpt-4": {"prompt_per_1k": 0.03, "completion_per_1k": 0.06},
              "GPT-4": {"prompt_per_1k": 0.0, "completion_per_1k": 0.0}}  # fmt: skip
    monkeypatch.setenv("GOVERNOR_PRICES__MODELS", json.dumps(prices))

    code, _, stderr = show()

    assert code == 2
    assert "models 'gpt-4' and 'GPT-4' differ only in case" in stderr


def test_a_model_is_priced_whatever_the_case_of_its_name() -> None:
    table = PriceTable.from_settings(Settings().prices)
    assert table.price("GPT-4") == table.price("gpt-4") != table.price("gpt-4o")
    assert table.cost("Gpt-4", 1000, 0) == pytest.approx(0.03)
