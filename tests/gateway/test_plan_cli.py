"""The commands that put someone on a plan refuse a plan no `kind: Plan` document defines (exit
2, the known plans, "did you mean"), and `tenants list` flags tenants on a plan since removed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from typer.testing import CliRunner, Result

from controller.cli import app
from controller.contract.keys import KeySchema
from controller.control.catalog import publish_catalog
from controller.policy.loader import load_directory
from tests.gateway.conftest import PLANS_YAML, write_limits
from tests.support.redis import RedisServer

CATALOG = "the plan catalog the controller published (governor:plans)"


def governor(server: RedisServer, *args: str, policy_dir: Path | None = None) -> Result:
    env = {"GOVERNOR_REDIS__URL": server.url, "GOVERNOR_GATEWAY__API_KEY_SECRET": "s3cret"}
    if policy_dir is not None:
        env["GOVERNOR_CONTROLLER__POLICY_DIR"] = str(policy_dir)
    return CliRunner().invoke(app, list(args), env=env)


@pytest.fixture
def published(redis_server: RedisServer, db: redis.Redis[str], policy_dir: Path) -> RedisServer:
    """Redis with the limits and the catalog (free, paid, enterprise) a controller wrote."""
    write_limits(db, "governor", policy_dir)
    return redis_server


@pytest.mark.parametrize(
    ("command", "hint"),
    [
        (("tenants", "set", "acme", "platinum"), "paid). Gateways refuse"),
        (("tenants", "set", "acme", "fre"), "did you mean 'free'? Gateways refuse"),
        (("keys", "create", "--tenant", "acme", "--plan", "no-such-plan"), ""),
        (("keys", "create", "--tenant", "acme", "--plan", "paidd"), "did you mean 'paid'?"),
        (("override", "set", "plan/nosuchplan/requests_per_minute", "5", "--ttl", "1h",
          "--reason", "INC-1"), ""),
    ],
)  # fmt: skip
def test_an_unknown_plan_is_refused_with_the_known_plans(
    published: RedisServer, db: redis.Redis[str], command: tuple[str, ...], hint: str
) -> None:
    result = governor(published, *command)

    assert result.exit_code == 2, result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert CATALOG in result.stderr
    assert "known plans: enterprise, free, metered, paid" in result.stderr
    assert hint in result.stderr
    # Nothing was written: no registry entry, no key, no override, no journal event.
    assert db.hgetall("governor:tenants") == {}
    assert db.hgetall(KeySchema().api_keys) == {}
    assert db.keys("governor:override:*") == []
    assert db.xlen(KeySchema().journal) == 0


def test_a_known_plan_is_accepted(published: RedisServer, db: redis.Redis[str]) -> None:
    assert governor(published, "tenants", "set", "acme", "paid").exit_code == 0
    assert (
        governor(published, "keys", "create", "--tenant", "initech", "--plan", "free").exit_code
        == 0
    )
    pinned = governor(published, "override", "set", "plan/free/requests_per_minute", "5",
                      "--ttl", "1h", "--reason", "INC-2")  # fmt: skip
    assert pinned.exit_code == 0, pinned.output
    assert db.hget("governor:tenants", "acme") == "paid"


@pytest.mark.parametrize(
    ("first", "source"),
    [
        (("tenants", "set", "acme", "paid"), "the tenant registry"),
        (("keys", "create", "--tenant", "acme", "--plan", "paid"), "its API keys"),
    ],
    ids=["registered", "known by its keys"],
)
def test_a_key_on_another_plan_than_its_tenants_is_refused(
    published: RedisServer, db: redis.Redis[str], first: tuple[str, ...], source: str
) -> None:
    # It was created: gateways enforced `free` on it while the controller, reading the
    # registry, held acme to `paid`; a tenant known only by keys on two plans had none.
    assert governor(published, *first).exit_code == 0
    keys, events = db.hgetall(KeySchema().api_keys), db.xlen(KeySchema().journal)

    result = governor(published, "keys", "create", "--tenant", "acme", "--plan", "free")

    assert result.exit_code == 2, result.output
    assert result.stderr == (
        f"error: tenant 'acme' is on plan 'paid' ({source}) and a key carries its tenant's "
        "plan: gateways would enforce 'free' on this key while the controller reads 'paid'. "
        "Create it with --plan paid, or move the tenant and its keys first: governor tenants "
        "set acme free\n"
    )
    assert result.stdout == ""  # no key shown
    assert db.hgetall(KeySchema().api_keys) == keys
    assert db.xlen(KeySchema().journal) == events
    # The way it names: the tenant moves with its keys, and then takes a key on `free`.
    assert governor(published, "tenants", "set", "acme", "free").exit_code == 0
    created = governor(published, "keys", "create", "--tenant", "acme", "--plan", "free")
    assert created.exit_code == 0, created.output
    plans = {json.loads(r)["plan"] for r in db.hvals(KeySchema().api_keys)}
    assert plans == {"free"}


def test_before_any_catalog_the_configured_policy_directory_says_which_plans_exist(
    redis_server: RedisServer, db: redis.Redis[str], policy_dir: Path, tmp_path: Path
) -> None:
    refused = governor(redis_server, "tenants", "set", "acme", "gold", policy_dir=policy_dir)
    assert refused.exit_code == 2
    assert f"the policy directory {policy_dir} (no plan catalog in Redis" in refused.stderr
    accepted = governor(redis_server, "tenants", "set", "acme", "free", policy_dir=policy_dir)
    assert accepted.exit_code == 0, accepted.output
    (tmp_path / "broken.yaml").write_text("kind: Plan\nspec: [\n")
    broken = governor(redis_server, "tenants", "set", "acme", "free", policy_dir=tmp_path)
    assert broken.exit_code == 2
    assert "start the controller (governor run)" in broken.stderr


def test_tenants_list_flags_a_plan_removed_from_the_policies(
    published: RedisServer, db: redis.Redis[str], tmp_path: Path
) -> None:
    assert governor(published, "tenants", "set", "acme", "free").exit_code == 0
    assert governor(published, "tenants", "set", "initech", "paid").exit_code == 0
    (tmp_path / "plans.yaml").write_text(PLANS_YAML.replace("name: paid", "name: paid-v2"))
    publish_catalog(db, load_directory(tmp_path), prefix="governor")  # paid is gone

    listed = governor(published, "tenants", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert json.loads(listed.stdout) == {
        "acme": {"plan": "free", "unknown_plan": False},
        "initech": {"plan": "paid", "unknown_plan": True},
    }
    assert "1 tenant(s) on a plan not in the plan catalog" in listed.stderr
    table = governor(published, "tenants", "list")
    assert "NO: refused by gateways" in table.stdout
    assert "initech" in table.stderr


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        # free may call gpt-3.5-turbo only: a free limit on gpt-4 pins what no request meets.
        ("plan/free/requests_per_minute@gpt-4", "plan 'free' may not call model 'gpt-4'"),
        ("plan/paid/requests_per_minute@gpt-4", None),
        ("plan/free/requests_per_minute@gpt-3.5-turbo", None),
        # enterprise and metered may call any model: a global narrowing is theirs to meet.
        ("global/requests_per_second@gpt-5", None),
    ],
)
def test_an_override_on_a_model_no_plan_in_scope_may_call_is_refused(
    published: RedisServer, db: redis.Redis[str], address: str, refused: str | None
) -> None:
    result = governor(published, "override", "set", address, "5", "--ttl", "1h",
                      "--reason", "INC-3")  # fmt: skip
    if refused is None:
        assert result.exit_code == 0, result.output
        assert db.keys("governor:override:*") != []
        return
    assert result.exit_code == 2, result.output
    assert refused in result.stderr
    assert f"models in {CATALOG}: gpt-3.5-turbo" in result.stderr
    assert db.keys("governor:override:*") == []
    assert db.xlen(KeySchema().journal) == 0


def test_where_every_plan_names_its_models_a_global_override_needs_one_of_them(
    redis_server: RedisServer, db: redis.Redis[str]
) -> None:
    # The shipped plans all list their models (no catalog yet: the policy directory says).
    shipped = Path(__file__).resolve().parents[2] / "policies"
    refused = governor(redis_server, "override", "set", "global/requests_per_second@gpt-5",
                       "5", "--ttl", "1h", "--reason", "INC-4", policy_dir=shipped)  # fmt: skip
    assert refused.exit_code == 2, refused.output
    assert "no plan may call model 'gpt-5'" in refused.stderr
    assert "gpt-3.5-turbo, gpt-4, gpt-4o" in refused.stderr
    assert "did you mean 'gpt-4'?" in refused.stderr
    assert db.keys("governor:override:*") == []
    accepted = governor(redis_server, "override", "set", "global/requests_per_second@gpt-4o",
                        "5", "--ttl", "1h", "--reason", "INC-4", policy_dir=shipped)  # fmt: skip
    assert accepted.exit_code == 0, accepted.output


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        # bob is on free (gpt-3.5-turbo only): that enterprise calls any model is not bob's.
        ("tenant/bob/tokens_per_minute@gpt-4", "tenant 'bob' is on plan 'free', which may not"),
        ("user/bob/u1/tokens_per_minute@gpt-4", "tenant 'bob' is on plan 'free', which may not"),
        ("tenant/bob/tokens_per_minute@gpt-3.5-turbo", None),
        # dave is known by his API key, on paid (gpt-3.5-turbo, gpt-4).
        ("tenant/dave/tokens_per_minute@gpt-4", None),
        ("tenant/dave/tokens_per_minute@llama-3-70b", "tenant 'dave' is on plan 'paid', which"),
        ("tenant/carol/tokens_per_minute@llama-3-70b", None),  # enterprise: any model
        # Not known: any plan's tenant it may become (enterprise calls any model).
        ("tenant/nobody/tokens_per_minute@llama-3-70b", None),
    ],
)
def test_an_override_on_a_tenants_model_is_checked_against_the_tenants_plan(
    published: RedisServer, db: redis.Redis[str], address: str, refused: str | None
) -> None:
    db.hset("governor:tenants", mapping={"bob": "free", "carol": "enterprise"})
    created = governor(published, "keys", "create", "--tenant", "dave", "--plan", "paid")
    assert created.exit_code == 0, created.output
    result = governor(published, "override", "set", address, "5", "--ttl", "1h",
                      "--reason", "INC-6")  # fmt: skip
    if refused is None:
        assert result.exit_code == 0, result.output
        assert db.exists(f"governor:override:{address}") == 1
        return
    assert result.exit_code == 2, result.output
    assert refused in result.stderr
    assert f"(models in {CATALOG}: " in result.stderr
    assert db.keys("governor:override:*") == []
