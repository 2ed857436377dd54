"""JWT bearer auth: good tokens name tenant/plan/user; every hostile token is a clean 401."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.errors import ConfigurationError
from controller.gateway.auth import Authenticator, AuthError, JwksCache, Principal
from controller.settings import GatewaySettings
from tests.gateway.fake_upstream import FakeUpstream, ServerThread

ISSUER = "https://issuer.example"
AUDIENCE = "governor-gateway"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


FUZZ_PEM = public_pem(ec.generate_private_key(ec.SECP256R1()))


def jwt_settings(pem: str, **overrides: Any) -> GatewaySettings:
    return GatewaySettings(
        jwt_public_key=pem, jwt_issuer=ISSUER, jwt_audience=AUDIENCE, **overrides
    )


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "acme",
        "plan": "free",
        "exp": now + 600,
        "iat": now,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def authenticate(auth: Authenticator, token: str) -> Principal:
    return asyncio.run(auth.authenticate({"authorization": f"Bearer {token}"}))


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged_hs256(payload: dict[str, Any], secret: bytes) -> str:
    """HS256 signed with `secret`, built by hand (PyJWT refuses to sign with a PEM)."""
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + b64(json.dumps(payload).encode())
    )
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + b64(signature)


def test_a_good_token_names_tenant_plan_and_user(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(jwt_settings(public_pem(rsa_key), user_claim="uid"), None)
    token = jwt.encode(claims(uid="alice", jti="t-1"), rsa_key, algorithm="RS256")

    principal = authenticate(auth, token)

    assert principal == Principal("acme", "free", "alice", "jwt", "t-1")


def test_claim_names_are_configurable(rsa_key: rsa.RSAPrivateKey) -> None:
    settings = jwt_settings(public_pem(rsa_key), plan_claim="tier", tenant_claims=["org"])
    auth = Authenticator(settings, None)
    token = jwt.encode(claims(plan=None, tier="paid", org="globex"), rsa_key, algorithm="RS256")

    principal = authenticate(auth, token)

    assert (principal.tenant, principal.plan) == ("globex", "paid")
    with pytest.raises(AuthError, match="'tier'"):
        authenticate(auth, jwt.encode(claims(org="globex"), rsa_key, algorithm="RS256"))


def test_the_tenant_claim_wins_over_sub(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(jwt_settings(public_pem(rsa_key)), None)
    token = jwt.encode(claims(tenant="initech", sub="someone"), rsa_key, algorithm="RS256")

    assert authenticate(auth, token).tenant == "initech"


@pytest.mark.parametrize("tenant", ["", "-acme", "a}{b", "x\ny", "t" * 129, "ácme", 5, None])
def test_an_unusable_tenant_claim_is_refused_never_passed_over_for_sub(
    rsa_key: rsa.RSAPrivateKey, tenant: Any
) -> None:
    # `sub` is a safe id, and the next claim in TENANT_CLAIMS: a `tenant` claim present but
    # unusable must not make the token tenant `acme`'s.
    auth = Authenticator(jwt_settings(public_pem(rsa_key)), None)
    body = {**claims(), "tenant": tenant}
    with pytest.raises(AuthError) as refused:
        authenticate(auth, jwt.encode(body, rsa_key, algorithm="RS256"))
    detail = refused.value.detail
    assert "token claim 'tenant'" in detail
    if isinstance(tenant, str):
        assert "1-128 of A-Z a-z 0-9 ._:+=~-, starting with a letter or digit" in detail


def hostile_tokens(
    rsa_key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> Iterator[tuple[str, str, str]]:
    """(name, token, what the 401 must say)."""
    now = int(time.time())
    yield "alg none", jwt.encode(claims(), "", algorithm="none"), "algorithm 'none'"
    pem = public_pem(rsa_key).encode()
    yield "HS256 with the RSA public key", forged_hs256(claims(), pem), "algorithm 'HS256'"
    yield "expired", jwt.encode(claims(exp=now - 3600), rsa_key, algorithm="RS256"), "expired"
    not_yet = claims(nbf=now + 3600)
    yield "nbf in the future", jwt.encode(not_yet, rsa_key, algorithm="RS256"), "not valid yet"
    yield "wrong aud", jwt.encode(claims(aud="other"), rsa_key, algorithm="RS256"), "audience"
    yield "wrong iss", jwt.encode(claims(iss="https://evil"), rsa_key, algorithm="RS256"), "issuer"
    yield "no exp", jwt.encode(claims(exp=None), rsa_key, algorithm="RS256"), "required claim"
    yield "no aud", jwt.encode(claims(aud=None), rsa_key, algorithm="RS256"), "required claim"
    yield "no plan", jwt.encode(claims(plan=None), rsa_key, algorithm="RS256"), "'plan'"
    no_tenant = claims(sub=None)
    yield "no tenant", jwt.encode(no_tenant, rsa_key, algorithm="RS256"), "no tenant claim"
    yield "plan not a string", jwt.encode(claims(plan=7), rsa_key, algorithm="RS256"), "'plan'"
    # Validly signed, so "malformed token" (what they said) sent the caller looking elsewhere.
    numeric_sub = claims(sub=5, tenant="acme")
    yield "sub a number", jwt.encode(numeric_sub, rsa_key, algorithm="RS256"), "sub is not a"
    jti = claims(jti={"n": 1})
    yield "jti an object", jwt.encode(jti, rsa_key, algorithm="RS256"), "jti is not a string"
    unsafe = claims(sub="acme/../other")
    yield "unsafe tenant id", jwt.encode(unsafe, rsa_key, algorithm="RS256"), "safe tenant"
    yield "another key", jwt.encode(claims(), other, algorithm="RS256"), "bad signature"
    yield "EC token, RSA key", jwt.encode(claims(), ec_key, algorithm="ES256"), "key type"
    yield "garbage", "not-a-jwt", "malformed"
    yield "three dots of garbage", "a.b.c", "malformed"
    yield "empty segments", "..", "malformed"
    yield "binary header", b64(b"\xff\xfe\x00") + ".e30.sig", "malformed"
    yield "header not an object", b64(b"[1,2]") + ".e30.sig", "malformed"
    yield "huge", "x" * 1_000_000, "longer than"


def test_hostile_tokens_are_refused_with_a_reason_never_an_exception(
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
) -> None:
    auth = Authenticator(jwt_settings(public_pem(rsa_key)), None)
    outcomes = {}
    for name, token, reason in hostile_tokens(rsa_key, other_rsa_key, ec_key):
        with pytest.raises(AuthError) as caught:
            authenticate(auth, token)
        outcomes[name] = reason in caught.value.detail or caught.value.detail

    assert all(v is True for v in outcomes.values()), outcomes


@settings(max_examples=300, deadline=None)
@given(token=st.text(min_size=1, max_size=300) | st.builds(
    lambda h, p, s: f"{h}.{p}.{s}",
    st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=60),
    st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=60),
    st.text(alphabet="ABCDEFabcdef0123456789-_", max_size=60),
))  # fmt: skip
def test_random_bearer_tokens_raise_only_auth_error(token: str) -> None:
    auth = Authenticator(jwt_settings(FUZZ_PEM), None)
    with pytest.raises(AuthError):
        asyncio.run(auth.authenticate({"authorization": f"Bearer {token}"}))


def test_missing_or_malformed_authorization_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(jwt_settings(public_pem(rsa_key)), None)
    for headers in ({}, {"authorization": "Basic dXNlcjpwYXNz"}, {"authorization": "Bearer "}):
        with pytest.raises(AuthError):
            asyncio.run(auth.authenticate(headers))


def test_settings_refuse_symmetric_and_none_algorithms() -> None:
    for algorithms in (["HS256"], ["none"], ["RS256", "HS512"], []):
        with pytest.raises(ValueError, match="asymmetric"):
            GatewaySettings(jwt_algorithms=algorithms)


def test_jwt_auth_without_issuer_and_audience_is_a_configuration_error(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    with pytest.raises(ConfigurationError, match="JWT_ISSUER"):
        Authenticator(GatewaySettings(jwt_public_key=public_pem(rsa_key)), None)
    with pytest.raises(ConfigurationError, match="not a PEM public key"):
        Authenticator(jwt_settings("-----BEGIN PUBLIC KEY-----\nnope\n"), None)


def test_jwks_keys_are_fetched_over_http_and_picked_by_kid(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey
) -> None:
    upstream = FakeUpstream()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    upstream.jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig"}]}
    server = ServerThread(upstream.app()).start()
    settings = GatewaySettings(
        jwt_jwks_url=f"{server.url}/jwks", jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )
    good = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    unknown_kid = jwt.encode(claims(), other_rsa_key, algorithm="RS256", headers={"kid": "k9"})
    wrong_key = jwt.encode(claims(), other_rsa_key, algorithm="RS256", headers={"kid": "k1"})
    # The kid is the caller's own text: quoted whole, 8 KB of it came back twice in the 401
    # (detail and WWW-Authenticate), past what a proxy in front buffers for headers.
    long_kid = jwt.encode(claims(), other_rsa_key, algorithm="RS256", headers={"kid": "k" * 5000})

    async def run() -> list[Principal | str]:
        async with httpx.AsyncClient() as client:
            jwks = JwksCache(settings.jwt_jwks_url or "", client, 300.0)
            auth = Authenticator(settings, None, jwks)
            results: list[Principal | str] = []
            for token in (good, unknown_kid, wrong_key, long_kid):
                try:
                    results.append(await auth.authenticate({"authorization": f"Bearer {token}"}))
                except AuthError as exc:
                    results.append(exc.detail)
            return results

    try:
        results = asyncio.run(run())
    finally:
        server.stop()

    assert results[0] == Principal("acme", "free", None, "jwt", "acme")
    assert results[1] == "no signing key 'k9' at the issuer's JWKS"
    assert results[2] == "invalid token: bad signature"
    assert results[3] == f"no signing key {'k' * 40!r}… at the issuer's JWKS"


def test_a_flood_of_made_up_kids_at_once_makes_one_jwks_fetch(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    # Concurrent requests each started a fetch (100 tokens at once: 100 fetches of the
    # issuer's JWKS), the 10 s guard seeing none of them finished yet.
    upstream = FakeUpstream()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key.public_key()))
    upstream.jwks = {"keys": [{**jwk, "kid": "k1", "use": "sig"}]}
    server = ServerThread(upstream.app()).start()
    settings = GatewaySettings(
        jwt_jwks_url=f"{server.url}/jwks", jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )
    made_up = [
        jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": f"x{n}"})
        for n in range(100)
    ]

    async def run() -> list[str]:
        async with httpx.AsyncClient() as client:
            auth = Authenticator(
                settings, None, JwksCache(settings.jwt_jwks_url or "", client, 300)
            )

            async def one(token: str) -> str:
                try:
                    await auth.authenticate({"authorization": f"Bearer {token}"})
                except AuthError as exc:
                    return exc.detail
                return "served"

            return await asyncio.gather(*(one(token) for token in made_up))

    try:
        details = asyncio.run(run())
    finally:
        server.stop()

    assert upstream.jwks_fetches == 1
    assert set(details) == {f"no signing key 'x{n}' at the issuer's JWKS" for n in range(100)}


def test_an_unreadable_jwks_is_not_fetched_again_for_each_request() -> None:
    upstream = FakeUpstream()
    upstream.jwks = {"keys": "not a list"}
    server = ServerThread(upstream.app()).start()
    settings = GatewaySettings(
        jwt_jwks_url=f"{server.url}/jwks", jwt_issuer=ISSUER, jwt_audience=AUDIENCE
    )

    async def run() -> list[str]:
        async with httpx.AsyncClient() as client:
            jwks = JwksCache(settings.jwt_jwks_url or "", client, 300)
            details = []
            for _ in range(5):
                try:
                    await jwks.key("k1")
                except AuthError as exc:
                    details.append(exc.detail)
            return details

    try:
        details = asyncio.run(run())
    finally:
        server.stop()

    assert upstream.jwks_fetches == 1
    assert len(details) == 5
    assert all(d.startswith("cannot read the issuer's JWKS (") for d in details)


def test_a_token_living_longer_than_the_maximum_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator(jwt_settings(public_pem(rsa_key)), None)
    now = int(time.time())
    forever = jwt.encode(claims(exp=1e30), rsa_key, algorithm="RS256")
    a_day_and_a_second = jwt.encode(claims(exp=now + 86401, iat=now), rsa_key, algorithm="RS256")
    a_day = jwt.encode(claims(exp=now + 86400, iat=now), rsa_key, algorithm="RS256")

    for token in (forever, a_day_and_a_second):
        with pytest.raises(AuthError, match=r"lifetime \(exp - iat\)"):
            authenticate(auth, token)
    assert authenticate(auth, a_day).plan == "free"
    shorter = Authenticator(jwt_settings(public_pem(rsa_key), jwt_max_lifetime_seconds=60), None)
    with pytest.raises(AuthError, match="above the 60 s accepted"):
        authenticate(shorter, jwt.encode(claims(), rsa_key, algorithm="RS256"))  # 600 s


def test_exp_and_iat_are_required_unless_configured_otherwise(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    strict = Authenticator(jwt_settings(public_pem(rsa_key)), None)
    lenient = Authenticator(jwt_settings(public_pem(rsa_key), jwt_require_exp_iat=False), None)
    no_iat = jwt.encode(claims(iat=None), rsa_key, algorithm="RS256")
    no_exp = jwt.encode(claims(exp=None), rsa_key, algorithm="RS256")

    for token in (no_iat, no_exp):
        with pytest.raises(AuthError, match="a required claim"):
            authenticate(strict, token)
        assert authenticate(lenient, token).tenant == "acme"


def test_a_token_issued_in_the_future_is_refused_beyond_the_leeway(
    rsa_key: rsa.RSAPrivateKey,
) -> None:
    auth = Authenticator(jwt_settings(public_pem(rsa_key)), None)  # leeway 30 s
    now = int(time.time())
    ahead = jwt.encode(claims(iat=now + 3600, exp=now + 4000), rsa_key, algorithm="RS256")
    skewed = jwt.encode(claims(iat=now + 10, exp=now + 600), rsa_key, algorithm="RS256")

    with pytest.raises(AuthError, match="iat in the future"):
        authenticate(auth, ahead)
    assert authenticate(auth, skewed).tenant == "acme"
