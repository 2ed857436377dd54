"""The Redis-backed commands through typer's CliRunner, against a real redis-server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from controller.changes import diff
from controller.cli import app
from controller.contract.keys import KeySchema
from controller.gateway.keys import KeyStore
from controller.model import Address
from controller.settings import RedisSettings
from controller.sinks.redis import RedisSink
from tests.support.redis import RedisServer

runner = CliRunner()


def run(url: str | None, *args: str) -> Result:
    env = {"GOVERNOR_REDIS__URL": url} if url else {}
    return runner.invoke(app, list(args), env=env)


def ok(url: str, *args: str) -> Result:
    result = run(url, *args)
    assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def url(redis_server: RedisServer, db: redis.Redis[str]) -> str:
    return redis_server.url


def test_limits_get_json_is_the_stable_shape(url: str) -> None:
    sink = RedisSink.from_url(url, RedisSettings())
    desired = {
        Address.parse("global/requests_per_second"): 2000.0,
        Address.parse("tenant/acme/tokens_per_minute@gpt-4"): 12.5,
        Address.parse("tenant/bob/tokens_per_minute"): 7.0,
    }
    sink.apply(diff(desired, sink.read()))
    assert json.loads(ok(url, "limits", "get", "--json").stdout) == {
        "version": 1,
        "limits": {
            "global/requests_per_second": 2000,
            "tenant/acme/tokens_per_minute@gpt-4": 12.5,
            "tenant/bob/tokens_per_minute": 7,
        },
    }
    only = json.loads(ok(url, "limits", "get", "tenant/acme", "--json").stdout)
    assert only["limits"] == {"tenant/acme/tokens_per_minute@gpt-4": 12.5}
    table = ok(url, "limits", "get").stdout
    assert "version 1" in table
    assert "tenant/bob/tokens_per_minute" in table


def test_override_set_list_clear_are_journalled(url: str, db: redis.Redis[str]) -> None:
    address = "tenant/acme/tokens_per_minute"
    out = ok(url, "override", "set", address, "5000", "--ttl", "1h", "--reason", "INC-42",
             "--actor", "alice").stdout  # fmt: skip
    assert "until" in out
    assert 3_500_000 < db.pttl(f"governor:override:{address}") <= 3_600_000
    listed = json.loads(ok(url, "override", "list", "--json").stdout)
    assert [(o["address"], o["value"], o["actor"]) for o in listed["overrides"]] == [
        (address, 5000.0, "alice")
    ]
    assert "INC-42" in ok(url, "override", "list").stdout
    ok(url, "override", "clear", address, "--reason", "resolved", "--actor", "bob")
    assert json.loads(ok(url, "override", "list", "--json").stdout)["overrides"] == []
    events = [json.loads(line) for line in ok(url, "audit", "tail", "--json").stdout.splitlines()]
    assert [(e["kind"], e["actor"], e["reason"], e["old"], e["new"]) for e in events] == [
        ("override.set", "alice", "INC-42", None, 5000.0),
        ("override.cleared", "bob", "resolved", 5000.0, None),
    ]


def test_an_override_on_an_unregistered_tenant_is_written_with_a_warning(
    url: str, db: redis.Redis[str]
) -> None:
    """`override set tenant/nobody/…` succeeded silently: a typo pinned a limit nobody has."""
    pin = ("tokens_per_minute", "5000", "--ttl", "1h", "--reason", "INC-8")
    empty = ok(url, "override", "set", "tenant/nobody/" + pin[0], *pin[1:])
    assert empty.stderr == ""  # no tenant registered yet: nothing to say it is not one of
    ok(url, "tenants", "set", "acme", "paid")
    ok(url, "tenants", "set", "acme-eu", "paid")
    ok(url, "keys", "create", "--tenant", "initech", "--plan", "paid", "--reason", "x")
    typo = ok(url, "override", "set", "tenant/acmee/" + pin[0], *pin[1:])
    assert typo.stderr.startswith("warning: tenant 'acmee' is not registered")
    assert "did you mean 'acme' or 'acme-eu'?" in typo.stderr
    assert "governor tenants set acmee PLAN" in typo.stderr
    assert "override tenant/acmee/tokens_per_minute = 5000" in typo.stdout  # still written
    assert db.exists("governor:override:tenant/acmee/tokens_per_minute") == 1
    refused = run(url, "override", "set", "tenant/acmee/tokens_per_minute@gpt-5", *pin[1:])
    assert refused.exit_code == 2  # no shipped plan calls gpt-5: nothing is "written anyway"
    assert "warning" not in refused.stderr
    far = ok(url, "override", "set", "user/zzz/u1/" + pin[0], *pin[1:])
    assert "tenant 'zzz' is not registered (no `governor tenants set`, no API key" in far.stderr
    assert "did you mean" not in far.stderr
    for known in ("acme", "initech"):  # registered, or known by its API key as gateways know it
        assert ok(url, "override", "set", f"tenant/{known}/" + pin[0], *pin[1:]).stderr == ""


def test_credits_for_an_unregistered_tenant_are_booked_with_a_warning(url: str) -> None:
    """`credits top-up acmee 250` booked the money on a typo silently: nobody could spend it."""
    ok(url, "tenants", "set", "acme", "paid")
    typo = ok(url, "credits", "top-up", "acmee", "250", "--reason", "invoice 7")
    assert typo.stderr.startswith("warning: tenant 'acmee' is not registered")
    assert "did you mean 'acme'?" in typo.stderr
    assert "governor credits adjust TENANT --charge USD" in typo.stderr  # how to take it back
    assert "balance 250.000000 USD" in typo.stdout  # still booked
    back = ok(url, "credits", "adjust", "acmee", "--charge", "250", "--reason", "typo")
    assert "warning: tenant 'acmee'" in back.stderr
    assert ok(url, "credits", "top-up", "acme", "250", "--reason", "invoice 7").stderr == ""


@pytest.mark.parametrize("command", ["override", "freeze"])
def test_a_ttl_shorter_than_a_tick_is_refused_before_anything_is_written(
    url: str, db: redis.Redis[str], command: str
) -> None:
    """`--ttl 1ms` (or 2s, under a 5 s tick) said "set" and exit 0, journalled, and expired
    before the controller's next tick read it: a pin or freeze never in force."""
    args = ["override", "set", "tenant/acme/tokens_per_minute", "5"]
    refused = run(url, *(args if command == "override" else ["freeze"]), "--ttl", "2s",
                  "--reason", "INC-9")  # fmt: skip
    assert refused.exit_code == 2, refused.output
    assert "'2s' is shorter than a controller tick (5s" in refused.stderr
    assert "give at least 5s" in refused.stderr
    assert db.keys("governor:*override*") == []
    assert db.keys("governor:*freeze*") == []
    assert db.exists("governor:journal") == 0


def test_a_reason_is_required_and_addresses_are_checked(url: str) -> None:
    missing = run(url, "override", "set", "global/requests_per_second", "1", "--ttl", "1h")
    assert missing.exit_code == 2
    assert "--reason" in missing.output
    blank = run(url, "freeze", "--ttl", "30m", "--reason", " ")
    assert blank.exit_code == 2
    bad = run(url, "override", "set", "tenant/a}{b/tokens_per_minute", "1", "--ttl", "1h",
              "--reason", "x")  # fmt: skip
    assert bad.exit_code == 2
    assert "not a safe id" in bad.output or "letters, digits" in bad.output


def said(result: Result) -> str:
    """The output as one line: the usage box wraps its message over lines between '│'."""
    return " ".join(result.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("nope/x", "scope 'nope' is not one of global, ip, plan, tenant, user"),
        ("tenant/a}{b/tokens_per_minute", "tenant 'a}{b' must be 1-128 characters"),
        ("tenant/acme/tpm", "limit 'tpm' is not one of"),
        ("global/requests_per_second/", "expected the shape global/<limit>"),
    ],
)
def test_an_address_filter_is_refused_as_explain_refuses_the_address(
    url: str, address: str, problem: str
) -> None:
    """`audit tail --address nope/x` exited 0 saying "0 events": a filter no address can
    start with matched nothing, while `explain nope/x` named the mistake."""
    explained = said(run(url, "explain", address))
    message = explained[explained.index("invalid limit address") : explained.index("╰")].strip()
    assert problem in message
    for command in (("audit", "tail", "--since", "1h", "--address", address),
                    ("limits", "get", address)):  # fmt: skip
        result = run(url, *command)
        assert result.exit_code == 2, result.output
        assert message in said(result)


def test_explain_of_a_plan_that_does_not_exist_names_the_known_plans(
    url: str, db: redis.Redis[str]
) -> None:
    """`explain plan/fre/requests_per_minute` exited 0 with "stored value: -" and "no decision
    recorded": a typo read as a limit nobody set, where `override set` names the plans."""
    shipped = str(Path(__file__).parents[2] / "policies")
    env = {"GOVERNOR_REDIS__URL": url, "GOVERNOR_CONTROLLER__POLICY_DIR": shipped}
    typo = runner.invoke(app, ["explain", "plan/fre/requests_per_minute"], env=env)
    assert typo.exit_code == 2, typo.output
    assert typo.stdout == ""
    assert "error: no plan 'fre' in the policy directory" in typo.stderr
    assert "(known plans: enterprise, free, paid); did you mean 'free'?" in typo.stderr
    assert runner.invoke(app, ["explain", "plan/free/requests_per_minute"], env=env).exit_code == 0
    # A plan since removed keeps its history: what is stored is shown, not refused.
    db.hset("governor:limits:plan:retired", "requests_per_minute", "5")
    kept = runner.invoke(app, ["explain", "plan/retired/requests_per_minute"], env=env)
    assert kept.exit_code == 0, kept.output
    assert "stored value: 5" in kept.stdout


def test_explain_of_a_tenant_limit_without_its_own_value_names_the_plan_it_follows(
    url: str,
) -> None:
    """A 429 names `tenant/carol/requests_per_minute`; `explain` of it said only "stored
    value: -" and "no decision recorded", though the gateway enforces carol's plan's value:
    the on-call had no way from there to the value and its reasons."""
    ok(url, "tenants", "set", "carol", "free", "--reason", "test")
    out = said(ok(url, "explain", "tenant/carol/requests_per_minute@gpt-4"))
    assert (
        "no value of its own: tenant carol is on plan free, whose value the gateway applies: "
        "governor explain plan/free/requests_per_minute@gpt-4 (governor usage carol shows "
        "every limit in force)"
    ) in out
    shown = json.loads(ok(url, "explain", "tenant/carol/requests_per_minute", "--json").stdout)
    assert shown["follows"] == "plan/free/requests_per_minute"
    # A tenant of unknown plan: nothing to point at, nothing guessed.
    unknown = json.loads(ok(url, "explain", "tenant/nobody/requests_per_minute", "--json").stdout)
    assert unknown["follows"] is None
    # A value of its own (an override here): no pointer elsewhere.
    ok(url, "override", "set", "tenant/carol/requests_per_minute", "3", "--ttl", "1h",
       "--reason", "test")  # fmt: skip
    pinned = json.loads(ok(url, "explain", "tenant/carol/requests_per_minute", "--json").stdout)
    assert pinned["follows"] is None


def test_an_address_filter_of_whole_parts_still_filters(url: str) -> None:
    partial = run(url, "audit", "tail", "--address", "tenant/a}{b")
    assert partial.exit_code == 2  # a tenant id no address can hold, though no limit follows
    assert "invalid limit address 'tenant/a}{b': tenant 'a}{b' must be" in said(partial)
    tenant, wide = "tenant/acme/tokens_per_minute", "global/requests_per_second"
    for address in (tenant, wide):
        ok(url, "override", "set", address, "5", "--ttl", "1h", "--reason", "INC-5")
    for prefix, shown in (("tenant/", tenant), ("tenant/acme", tenant), (wide, wide)):
        lines = ok(url, "audit", "tail", "--address", prefix, "--json").stdout.splitlines()
        assert [json.loads(line)["address"] for line in lines] == [shown]


def test_a_tenant_filter_never_shows_a_tenant_whose_id_only_starts_the_same(url: str) -> None:
    # The runbook shows a tenant its own events with `--address tenant/<id>`: acme's filter
    # showed acmecorp's overrides and limits too (the filter was a plain text prefix).
    for tenant in ("acme", "acmecorp"):
        address = f"tenant/{tenant}/tokens_per_minute"
        ok(url, "override", "set", address, "5", "--ttl", "1h", "--reason", "INC-6")
    sink = RedisSink.from_url(url, RedisSettings())
    desired = {
        Address.parse("tenant/acme/tokens_per_minute@gpt-4"): 3.0,
        Address.parse("tenant/acmecorp/tokens_per_minute"): 4.0,
    }
    sink.apply(diff(desired, sink.read()))

    for prefix in ("tenant/acme", "tenant/acme/tokens_per_minute"):
        lines = ok(url, "audit", "tail", "--address", prefix, "--json").stdout.splitlines()
        assert [json.loads(line)["address"] for line in lines] == ["tenant/acme/tokens_per_minute"]
        shown = json.loads(ok(url, "limits", "get", prefix, "--json").stdout)["limits"]
        assert shown == {"tenant/acme/tokens_per_minute@gpt-4": 3}
    both = ok(url, "audit", "tail", "--address", "tenant/", "--json").stdout.splitlines()
    assert len(both) == 2


def test_a_bad_ttl_names_itself_and_the_durations_accepted(url: str) -> None:
    bad = run(url, "freeze", "--ttl", "an hour", "--reason", "x")
    assert bad.exit_code == 2
    said = " ".join(bad.output.replace("│", " ").split())  # the usage box wraps lines
    assert "'an hour' is not a duration: write a number and a unit (ms, s, m, h, d)" in said
    assert "e.g. 250ms, 30s, 2m, 1h30m" in said
    since = run(url, "audit", "tail", "--since", "1 week")
    assert since.exit_code == 2
    assert "'1 week' is not a duration" in " ".join(since.output.replace("│", " ").split())


@pytest.mark.parametrize(
    ("command", "option"),
    [
        (("override", "set", "tenant/acme/tokens_per_minute", "5", "--reason", "x"), "--ttl"),
        (("freeze", "--reason", "x"), "--ttl"),
        (("policy", "confirm-reload", "3f2a9c1b7e4d", "--reason", "x"), "--ttl"),
        (("audit", "tail"), "--since"),
    ],
)
@pytest.mark.parametrize("duration", ["0s", "400d"])
def test_a_duration_out_of_range_is_refused_naming_its_option(
    url: str, db: redis.Redis[str], command: tuple[str, ...], option: str, duration: str
) -> None:
    """`audit tail --since 0s` said "TTL '0s' must be longer than 0s", and no refusal of a
    duration named the option it was given to ("Invalid value: '400d' is not a ...")."""
    result = run(url, *command, option, duration)
    assert result.exit_code == 2, result.output
    assert f"Invalid value for {option}: '{duration}' is " in said(result)
    assert "TTL" not in said(result)
    assert db.keys("governor:*") == []


@pytest.mark.parametrize(
    "command",
    [
        ("override", "set", "tenant/acme/tokens_per_minute", "5", "--ttl", "-1h", "--reason", "x"),
        ("freeze", "--ttl", "-1h", "--reason", "x"),
        ("policy", "confirm-reload", "3f2a9c1b7e4d", "--ttl", "-1h", "--reason", "x"),
        ("audit", "tail", "--since", "-1h"),
    ],
)
def test_a_negative_duration_is_refused_as_negative(
    url: str, db: redis.Redis[str], command: tuple[str, ...]
) -> None:
    """`--ttl -1h` said only "is not a duration: write a number and a unit"."""
    result = run(url, *command)
    assert result.exit_code == 2, result.output
    assert "'-1h' is not a duration: a duration cannot be negative; write 1h" in said(result)
    assert db.keys("governor:*") == []  # nothing written, not even a journal event


def test_freeze_and_unfreeze(url: str, db: redis.Redis[str]) -> None:
    ok(url, "freeze", "--ttl", "30m", "--reason", "INC-7 investigating", "--actor", "carol")
    assert 1_700_000 < db.pttl("governor:freeze") <= 1_800_000
    assert json.loads(ok(url, "override", "list", "--json").stdout)["freeze"]["actor"] == "carol"
    assert "FROZEN" in ok(url, "override", "list").stdout
    assert "automation unfrozen" in ok(url, "unfreeze", "--actor", "carol").stdout
    assert db.exists("governor:freeze") == 0
    kinds = [json.loads(x)["kind"] for x in ok(url, "audit", "tail", "--json").stdout.splitlines()]
    assert kinds == ["freeze.set", "freeze.cleared"]


def test_one_journal_event_is_counted_in_the_singular(url: str) -> None:
    ok(url, "freeze", "--ttl", "5m", "--reason", "drill")
    assert "journal (1 event)" in ok(url, "audit", "tail").stdout  # was "(1 events)"


def test_actor_defaults_to_the_os_user(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("getpass.getuser", lambda: "oncall-dave")
    ok(url, "freeze", "--ttl", "5m", "--reason", "drill")
    (line,) = ok(url, "audit", "tail", "--json").stdout.splitlines()
    assert json.loads(line)["actor"] == "oncall-dave"


def test_tenants_set_get_list(url: str) -> None:
    ok(url, "tenants", "set", "acme", "paid")
    assert "was paid" in ok(url, "tenants", "set", "acme", "free").stdout
    assert ok(url, "tenants", "get", "acme").stdout.strip() == "free"
    missing = run(url, "tenants", "get", "nobody")
    assert missing.exit_code == 1
    listed = json.loads(ok(url, "tenants", "list", "--json").stdout)
    assert listed == {"acme": {"plan": "free", "unknown_plan": False}}
    assert "acme" in ok(url, "tenants", "list").stdout
    assert run(url, "tenants", "set", "a}{b", "paid").exit_code == 2


def test_tenants_get_of_an_unregistered_tenant_names_the_plan_its_keys_give_it(
    url: str, db: redis.Redis[str]
) -> None:
    # It said "takes the default plan" for a tenant whose keys put it on paid, which the
    # gateways enforce and the controller reads: the runbook's check of a tenant's plan lied.
    ok(url, "keys", "create", "--tenant", "initech", "--plan", "paid")
    # Keys on two plans (made before `keys create` refused that): `keys create` would refuse.
    for plan in ("paid", "free"):
        KeyStore(db, KeySchema("governor"), None).create("hooli", plan)

    keyed = run(url, "tenants", "get", "initech")
    mixed = run(url, "tenants", "get", "hooli")
    nobody = run(url, "tenants", "get", "nobody")
    as_json = json.loads(run(url, "tenants", "get", "initech", "--json").stdout)

    assert [keyed.exit_code, mixed.exit_code, nobody.exit_code] == [1, 1, 1]
    assert keyed.stderr == (
        "tenant 'initech' is not registered; its API keys put it on plan 'paid' "
        "(`governor tenants set initech paid` registers it)\n"
    )
    assert mixed.stderr == (
        "tenant 'hooli' is not registered and its API keys are on several plans (free, paid): "
        "it has no plan until `governor tenants set hooli PLAN` registers it\n"
    )
    assert nobody.stderr == (
        "tenant 'nobody' is not registered and has no API key: it takes the default plan "
        "(`default_plan` of the Limits document; a JWT names its own)\n"
    )
    assert as_json == {"tenant": "initech", "plan": None, "api_key_plans": ["paid"]}


def test_tenants_list_flags_a_tenant_whose_keys_are_on_a_plan_gone_from_the_catalog(
    url: str, db: redis.Redis[str]
) -> None:
    # Only registered tenants were flagged, while the 403 unknown-plan answer sends the
    # caller's operator to `governor tenants list` for a key-only tenant too.
    ok(url, "tenants", "set", "acme", "free")
    KeyStore(db, KeySchema("governor"), None).create("initech", "retired")
    ok(url, "keys", "create", "--tenant", "hooli", "--plan", "paid")

    listed = run(url, "tenants", "list")

    assert listed.exit_code == 0
    assert listed.stderr.startswith("1 tenant(s) known only through API keys on a plan not in ")
    assert listed.stderr.endswith(
        ": initech (retired); move them (governor tenants set TENANT PLAN moves their keys too)\n"
    )


def test_explain_shows_proposals_override_winner_and_history(url: str) -> None:
    from controller.clients.redis import connect
    from controller.contract.keys import KeySchema
    from controller.control.reconciler import Reconciler
    from controller.journal.writer import Journal
    from controller.model import Decision, Proposal, SignalReading, Source
    from controller.settings import JournalSettings

    address = Address.parse("plan/free/requests_per_minute")
    gpu = SignalReading("gpu_util", 0.95, 1_700_000_000.0)
    proposals = (
        Proposal(address, 5.0, "ThrottlePolicy/gpu-saturation", "gpu hot", (gpu,)),
        Proposal(address, 8.0, "AdaptiveLimit/rps", "tracking 0.8", (gpu,)),
    )
    decision = Decision(address, 5.0, Source.POLICY, "ThrottlePolicy/gpu-saturation",
                        "most restrictive", (gpu,), proposals, 10.0, ("floor 1",))  # fmt: skip
    sink = RedisSink.from_url(url, RedisSettings())
    journal = Journal(connect(url, RedisSettings()), KeySchema(), JournalSettings())
    Reconciler(sink, journal).tick({address: decision}, tick=9, policy_version="v1")
    ok(url, "override", "set", str(address), "3", "--ttl", "1h", "--reason", "INC-9")
    data = json.loads(ok(url, "explain", str(address), "--json").stdout)
    assert data["stored"] == 5.0
    assert data["decision"]["baseline"] == 10.0
    assert [p["policy"] for p in data["decision"]["proposals"]] == [
        "ThrottlePolicy/gpu-saturation",
        "AdaptiveLimit/rps",
    ]
    assert data["decision"]["proposals"][0]["signals"][0]["value"] == 0.95
    assert data["override"]["value"] == 3.0
    assert [e["kind"] for e in data["events"]] == ["limit.changed", "override.set"]
    human = ok(url, "explain", str(address)).stdout
    for text in ("AdaptiveLimit/rps", "gpu_util=0.95", "winner: 5 from policy", "INC-9", "floor 1"):
        assert text in human


def test_without_a_url_the_cli_names_the_variable() -> None:
    result = run(None, "limits", "get")
    assert result.exit_code == 2
    assert "GOVERNOR_REDIS__URL" in result.output


def test_a_password_in_the_url_never_appears_in_output(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "auth", password="s3cr3t-pw").start()
    try:
        outputs = [
            ok(server.url, "freeze", "--ttl", "1m", "--reason", "x").output,
            ok(server.url, "audit", "tail", "--json").output,
            ok(server.url, "config", "show", "--json").output,
        ]
        wrong = server.url.replace("s3cr3t-pw", "wr0ng-pw")
        failed = run(wrong, "limits", "get")
        server.stop()
        down = run(server.url, "limits", "get")
    finally:
        server.stop()
    assert failed.exit_code == 1
    assert down.exit_code == 1
    for output in [*outputs, failed.output, down.output]:
        assert "s3cr3t-pw" not in output
        assert "wr0ng-pw" not in output


def test_audit_tail_escapes_control_characters_and_rich_markup(url: str) -> None:
    from controller.contract.keys import KeySchema
    from controller.journal.events import JournalEvent, Kind
    from controller.journal.writer import Journal
    from controller.settings import JournalSettings

    client = redis.Redis.from_url(url, decode_responses=True)
    journal = Journal(client, KeySchema("governor"), JournalSettings())
    journal.emit(
        JournalEvent(
            kind=Kind.POLICY_TRANSITION,
            actor="controller",
            reason="\x1b[2J\x1b[31mowned [bold red]LOUD[/bold red]\nforged line",
            policy="ThrottlePolicy/[blink]x[/blink]",
        )
    )
    client.close()

    table = ok(url, "audit", "tail").stdout
    assert "\x1b" not in table  # no escape sequence reaches the terminal
    assert "\\x1b[2J\\x1b[31mowned" in table.replace("\n", "").replace("│", "").replace(" ", "")
    assert "[bold" in table  # markup is shown as text, not interpreted
    assert "[blink]x[/blink]" in table
    assert "\\nforged" in table.replace(" ", "")  # the newline is shown escaped
    (line,) = ok(url, "audit", "tail", "--json").stdout.splitlines()
    assert "\x1b" not in line  # JSON escapes it (\u001b)
    assert json.loads(line)["reason"].startswith("\x1b[2J")


def test_audit_tail_shows_an_entry_governor_never_wrote_instead_of_failing(url: str) -> None:
    """One hand-written stream entry made `audit tail` exit 2 with a bare JSON error."""
    from controller.contract.keys import KeySchema
    from controller.journal.events import JournalEvent, Kind
    from controller.journal.writer import Journal
    from controller.settings import JournalSettings

    client = redis.Redis.from_url(url, decode_responses=True)
    journal = Journal(client, KeySchema("governor"), JournalSettings())
    journal.emit(JournalEvent(kind=Kind.FREEZE_SET, actor="alice", reason="before"))
    journal.flush()
    client.xadd("governor:journal", {"garbage": "1"})
    client.xadd("governor:journal", {"kind": "x", "data": '{"kind": "limit.changed", "a'})
    client.xadd("governor:journal", {"kind": "x", "data": '{"kind": "x", "actor": "a", '
                                     '"reason": "r", "old": "abc"}'})  # fmt: skip
    client.xadd("governor:journal", {"kind": "x", "data": "\x1b[31m[1]"})
    client.close()

    lines = ok(url, "audit", "tail", "--json").stdout.splitlines()
    events = [json.loads(line) for line in lines]
    assert [e["kind"] for e in events] == [Kind.FREEZE_SET] + [Kind.UNREADABLE] * 4
    assert all("not an event Governor writes" in e["reason"] for e in events[1:])
    table = ok(url, "audit", "tail").stdout
    assert "journal.unreadable" in table
    assert "\x1b" not in table


@pytest.mark.parametrize(
    "command",
    [
        ("override", "set", "tenant/acme/requests_per_minute", "5", "--ttl", "5m", "--reason", "x"),
        ("override", "clear", "tenant/acme/requests_per_minute", "--reason", "x"),
        ("freeze", "--ttl", "5m", "--reason", "x"),
        ("unfreeze", "--reason", "x"),
        ("tenants", "set", "acme", "paid"),
        ("keys", "create", "--tenant", "acme", "--plan", "paid", "--reason", "x"),
    ],
)
def test_a_redis_of_another_key_contract_is_refused_before_any_write(
    url: str, db: redis.Redis[str], command: tuple[str, ...]
) -> None:
    # Only `limits apply` and the catalog checked it: these wrote our keys (and a journal
    # entry) into another layout's Redis.
    db.set("governor:contract", "2")

    refused = run(url, *command)

    assert refused.exit_code == 1, refused.output
    said = " ".join(refused.output.split())
    assert "holds key contract '2' in governor:contract, this Governor speaks 1" in said
    assert "nothing is read or written there" in said
    assert db.keys("*") == ["governor:contract"]  # nothing written, not even the journal


@pytest.mark.parametrize(
    ("make_it", "hint"),
    [
        ({"replicaof": "127.0.0.1 9", "replica-read-only": "yes"},
         "this Redis is a read-only replica: point GOVERNOR_REDIS__URL at the master"),
        ({"maxmemory-policy": "noeviction", "maxmemory": "1"}, "this Redis is full"),
    ],
)  # fmt: skip
def test_a_redis_refusing_every_write_is_named_with_what_to_do(
    url: str, db: redis.Redis[str], make_it: dict[str, str], hint: str
) -> None:
    """A replica's READONLY and a full Redis's OOM reached the on-call engineer as the bare
    reply, which names no fix."""
    ok(url, "override", "set", "global/requests_per_second", "5", "--ttl", "1h", "--reason", "a")
    for name, value in make_it.items():
        if name == "replicaof":
            db.execute_command("REPLICAOF", *value.split())
        else:
            db.config_set(name, value)
    try:
        refused = run(url, "override", "set", "global/requests_per_second", "7", "--ttl", "1h",
                      "--reason", "INC-7")  # fmt: skip
    finally:
        db.execute_command("REPLICAOF", "NO", "ONE")
        db.config_set("maxmemory", "0")
    assert refused.exit_code == 1, refused.output
    assert hint in refused.stderr
