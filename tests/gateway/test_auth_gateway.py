"""Auth through the running gateway: every bad credential is a 401 problem+json (never a
500), a JWT's plan claim picks the models it may call, and API keys are stored as hashes."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt
import pytest
import redis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from typer.testing import CliRunner, Result

from controller.cli import app
from controller.contract.keys import KeySchema
from controller.gateway.keys import digest
from tests.gateway.conftest import PROBLEM, Gateway, MakeGateway
from tests.gateway.test_auth_jwt import AUDIENCE, ISSUER, claims, forged_hs256


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def jwt_gateway(make_gateway: MakeGateway, signing_key: rsa.RSAPrivateKey) -> Gateway:
    pem = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return make_gateway(
        jwt_public_key=pem.decode(),
        jwt_issuer=ISSUER,
        jwt_audience=AUDIENCE,
        key_cache_seconds=0,
    )


def token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    body: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "acme", "plan": "free"}
    body["iat"] = int(time.time())
    body["exp"] = body["iat"] + 600
    body.update(claims)
    return jwt.encode({k: v for k, v in body.items() if v is not None}, key, "RS256")


def test_hostile_credentials_are_401_problems(
    jwt_gateway: Gateway, signing_key: rsa.RSAPrivateKey
) -> None:
    public = signing_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    hostile = {
        "alg none": jwt.encode({"sub": "acme", "plan": "free"}, "", algorithm="none"),
        "HS256 with the public key": forged_hs256(claims(), public),
        "expired": token(signing_key, exp=int(time.time()) - 3600),
        "wrong aud": token(signing_key, aud="someone-else"),
        "wrong iss": token(signing_key, iss="https://evil.example"),
        "no plan": token(signing_key, plan=None),
        "garbage": "garbage",
        "huge": "e" * 12_000,
        "unknown API key": "gov_0123456789abcdef_" + "A" * 43,
    }
    answers = {name: jwt_gateway.chat(value) for name, value in hostile.items()}

    assert {n: a.status_code for n, a in answers.items()} == dict.fromkeys(hostile, 401)
    for answer in answers.values():
        assert answer.headers["content-type"] == PROBLEM
        assert answer.json()["status"] == 401
        assert answer.headers["www-authenticate"].startswith("Bearer")


def test_the_plan_claim_decides_which_models_a_token_may_call(
    jwt_gateway: Gateway, signing_key: rsa.RSAPrivateKey
) -> None:
    free = token(signing_key, plan="free")
    paid = token(signing_key, sub="initech", plan="paid")

    assert jwt_gateway.chat(free, model="gpt-4").status_code == 403
    assert jwt_gateway.chat(paid, model="gpt-4").status_code == 200
    assert jwt_gateway.chat(free).headers["x-ratelimit-remaining-requests"] == "9"


def run_cli(redis_url: str, *args: str) -> Result:
    env = {"GOVERNOR_REDIS__URL": redis_url, "GOVERNOR_GATEWAY__API_KEY_SECRET": "test-secret"}
    return CliRunner().invoke(app, list(args), env=env)


def test_keys_are_shown_once_stored_as_hmac_and_revocable(
    jwt_gateway: Gateway, db: redis.Redis[str]
) -> None:
    created = run_cli(jwt_gateway.redis_url, "keys", "create", "--tenant", "acme", "--plan",
                      "free", "--user", "alice", "--json")  # fmt: skip
    assert created.exit_code == 0, created.stderr
    made = json.loads(created.stdout)
    key, key_id = made["key"], made["key_id"]

    stored = db.hget(KeySchema("governor").api_keys, key_id)
    assert stored is not None
    assert key not in stored
    # The secret after `gov_<key_id>_` (url-safe base64: it may hold `_` itself).
    assert key.split("_", 2)[2] not in stored
    assert json.loads(stored)["digest"] == digest(key, "test-secret")
    listed = run_cli(jwt_gateway.redis_url, "keys", "list", "--json")
    assert [r["key_id"] for r in json.loads(listed.stdout)] == [key_id]
    assert key not in listed.stdout
    assert "digest" not in listed.stdout
    table = run_cli(jwt_gateway.redis_url, "keys", "list", "--tenant", "acme")
    assert key_id in table.stdout
    assert "alice" in table.stdout
    assert key not in table.stdout

    ok = jwt_gateway.chat(key)
    tampered = jwt_gateway.chat(key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB"))
    revoked = run_cli(jwt_gateway.redis_url, "keys", "revoke", key_id)
    after = jwt_gateway.chat(key)
    again = run_cli(jwt_gateway.redis_url, "keys", "revoke", key_id)

    assert ok.status_code == 200
    assert tampered.status_code == 401
    assert revoked.exit_code == 0
    assert after.status_code == 401  # this gateway caches keys for 0 s
    assert after.json()["detail"] == "unknown or revoked API key"
    assert again.exit_code == 1


def test_a_key_made_under_another_secret_does_not_open_the_gateway(
    jwt_gateway: Gateway, db: redis.Redis[str]
) -> None:
    created = run_cli(jwt_gateway.redis_url, "keys", "create", "--tenant", "acme", "--plan", "free")
    key = created.stdout.strip()
    record = json.loads(db.hget(KeySchema("governor").api_keys, key[4:20]) or "{}")
    record["digest"] = digest(key, "another-secret")
    db.hset(KeySchema("governor").api_keys, key[4:20], json.dumps(record))

    assert jwt_gateway.chat(key).status_code == 401


def test_a_non_key_bearer_without_jwt_configured_is_a_401_not_a_500(
    make_gateway: MakeGateway,
) -> None:
    # The refusal's detail may hold characters a header cannot carry ("…"): still a 401.
    answer = make_gateway().chat("not-a-governor-key-and-no-jwt-configured")
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].isascii()
    assert answer.json()["status"] == 401


def test_two_authorization_lines_are_refused_not_picked_from(
    jwt_gateway: Gateway, signing_key: rsa.RSAPrivateKey
) -> None:
    """The gateway kept the last Authorization line: a request carrying a free tenant's key
    and a paid tenant's token was served as whichever came last (nginx refuses a repeated
    Authorization itself, with its own 400)."""
    free = jwt_gateway.key("payer-free", "free")
    paid = token(signing_key, sub="payer-paid", plan="paid")
    for lines in ([free, paid], [paid, free]):
        answer = jwt_gateway.http.post(
            f"{jwt_gateway.url}/v1/chat/completions",
            json={
                "model": "gpt-4",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5,
            },
            headers=[("authorization", f"Bearer {line}") for line in lines],
        )
        assert answer.status_code == 401, answer.text[:300]
        assert answer.json()["detail"] == (
            "send one credential: Authorization holds several (a repeated header, or a list); "
            "the gateway will not pick one of them"
        )
