"""Who is calling: an API key or a JWT bearer token → tenant, plan, user; anything else → 401."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

import httpx
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from controller.errors import ConfigurationError, GovernorError
from controller.gateway.keys import KeyVerifier
from controller.model import validate_id
from controller.settings import GatewaySettings

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)
# The key type each algorithm family must be verified with: an RSA key never checks an
# ES256 signature, and no key ever checks HS* (the settings refuse HS* outright).
_KEY_TYPES: dict[str, tuple[type, ...]] = {
    "RS": (rsa.RSAPublicKey,),
    "PS": (rsa.RSAPublicKey,),
    "ES": (ec.EllipticCurvePublicKey,),
    "Ed": (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey),
}


class AuthError(GovernorError):
    """The request carries no valid credential; `detail` says why (safe to show the client)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller, as far as limits are concerned."""

    tenant: str
    plan: str
    user: str | None
    method: Literal["api_key", "jwt"]
    credential: str  # the key id or the token's `jti`/`sub`: for logs, never a secret


class JwksCache:
    """Signing keys of a JWKS URL, fetched with the gateway's async client and cached."""

    # An unknown kid, or a failed fetch, is tried again at most this often: a rotated key is
    # found quickly, and a flood of made-up kids cannot turn into a flood of JWKS fetches.
    RETRY_SECONDS = 10.0

    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        lifetime_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.client = client
        self.lifetime_seconds = lifetime_seconds
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._tried_at: float | None = None  # the last fetch, whatever came of it
        self._failure: str | None = None  # why the last fetch failed, while no key is held
        # One fetch at a time: concurrent requests with made-up kids each started their own
        # fetch (100 at once: 100 fetches), the 10 s guard seeing none finished yet.
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        """The key named `kid` (the only key when the set has one and no kid is given)."""
        if self._due(kid):
            async with self._lock:
                if self._due(kid):  # not fetched meanwhile by the request it waited for
                    await self._fetch()
        if not self._keys and self._failure is not None:
            raise AuthError(self._failure)
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        found = self._keys.get(kid or "")
        if found is None:
            # The kid is the caller's text (up to JWT_MAX_LENGTH): quoted in part, as `alg` is.
            shown = repr(kid) if kid is None or len(kid) <= 40 else f"{kid[:40]!r}…"
            raise AuthError(f"no signing key {shown} at the issuer's JWKS")
        return found

    def _due(self, kid: str | None) -> bool:
        """Whether to fetch now: the set is older than its lifetime, or `kid` is not in it;
        either way not again within RETRY_SECONDS (nor the lifetime, if shorter) of the last
        fetch, successful or not."""
        now = self._clock()
        if self._tried_at is not None and now - self._tried_at < min(
            self.RETRY_SECONDS, self.lifetime_seconds
        ):
            return False
        fetched = self._fetched_at
        return fetched is None or now - fetched > self.lifetime_seconds or kid not in self._keys

    async def _fetch(self) -> None:
        self._tried_at = self._clock()
        try:
            response = await self.client.get(self.url, timeout=5.0)
            response.raise_for_status()
            jwk_set = jwt.PyJWKSet.from_dict(response.json())
        except (httpx.HTTPError, ValueError, TypeError, KeyError, AttributeError,
                jwt.PyJWTError) as exc:  # fmt: skip
            # Keys held are kept (an issuer hiccup must not log everyone out); tried again
            # in RETRY_SECONDS, not on every request.
            self._failure = f"cannot read the issuer's JWKS ({type(exc).__name__})"
            if not self._keys:
                raise AuthError(self._failure) from None
            return
        self._keys = {k.key_id or "": k for k in jwk_set.keys}
        self._fetched_at = self._clock()
        self._failure = None


class Authenticator:
    """Turns request headers into a Principal or raises AuthError; never anything else."""

    def __init__(
        self,
        settings: GatewaySettings,
        verifier: KeyVerifier | None,
        jwks: JwksCache | None = None,
    ) -> None:
        self.settings = settings
        self.verifier = verifier
        self.jwks = jwks
        self.public_key = _load_public_key(settings.jwt_public_key)
        if (self.public_key or jwks) and not (settings.jwt_issuer and settings.jwt_audience):
            raise ConfigurationError(
                "JWT auth needs GOVERNOR_GATEWAY__JWT_ISSUER and GOVERNOR_GATEWAY__JWT_AUDIENCE "
                "(tokens of any issuer or audience would be accepted otherwise)"
            )

    @property
    def accepts_jwt(self) -> bool:
        return self.public_key is not None or self.jwks is not None

    async def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller named by `Authorization: Bearer …` or `x-api-key`; AuthError otherwise."""
        token = _credential(headers)
        if token.startswith("gov_"):
            return await self._api_key(token)
        if not self.accepts_jwt:
            raise AuthError("not a Governor API key (gov_…); JWT auth is not configured")
        if len(token) > self.settings.jwt_max_length:
            raise AuthError(f"bearer token longer than {self.settings.jwt_max_length} characters")
        try:
            return await self._jwt(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {_reason(exc)}") from None
        except (ValueError, TypeError, KeyError, OverflowError) as exc:
            # Crafted tokens can reach corners of the decoder that raise plain errors.
            raise AuthError(f"invalid token ({type(exc).__name__})") from None

    async def _api_key(self, token: str) -> Principal:
        if self.verifier is None:
            raise AuthError("API keys are not accepted here")
        record = await self.verifier.verify(token)
        if record is None:
            raise AuthError("unknown or revoked API key")
        return Principal(record.tenant, record.plan, record.user, "api_key", record.key_id)

    async def _jwt(self, token: str) -> Principal:
        header = jwt.get_unverified_header(token)
        algorithm = header.get("alg")
        if algorithm not in self.settings.jwt_algorithms:
            raise AuthError(f"algorithm {str(algorithm)[:20]!r} is not accepted")
        key: Any = self.public_key
        if self.jwks is not None:
            kid = header.get("kid")
            key = (await self.jwks.key(kid if isinstance(kid, str) else None)).key
        if not isinstance(key, _KEY_TYPES.get(str(algorithm)[:2], ())):
            raise AuthError(f"algorithm {algorithm} does not match the issuer's key type")
        claims = jwt.decode(
            token,
            key=cast(PublicKey, key),
            algorithms=[str(algorithm)],
            audience=self.settings.jwt_audience,
            issuer=self.settings.jwt_issuer,
            leeway=self.settings.jwt_leeway_seconds,
            # iat is validated when present: one further ahead than the leeway is refused.
            options={"require": self._required, "verify_iat": True},
        )
        self._check_lifetime(claims)
        return self._principal(claims)

    @property
    def _required(self) -> list[str]:
        required = ["iss", "aud"]
        return [*required, "exp", "iat"] if self.settings.jwt_require_exp_iat else required

    def _check_lifetime(self, claims: Mapping[str, Any]) -> None:
        """Refuse a token issued for longer than `jwt_max_lifetime_seconds` (exp - iat)."""
        exp, iat = claims.get("exp"), claims.get("iat")
        if exp is None or iat is None:  # only when jwt_require_exp_iat is off
            return
        lifetime = float(exp) - float(iat)
        longest = self.settings.jwt_max_lifetime_seconds
        if lifetime > longest:
            raise AuthError(
                f"invalid token: lifetime (exp - iat) {lifetime:.0f} s is above the "
                f"{longest:.0f} s accepted; ask the issuer for a shorter-lived token"
            )

    def _principal(self, claims: Mapping[str, Any]) -> Principal:
        settings = self.settings
        tenant_claim = next((c for c in settings.tenant_claims if c in claims), None)
        if tenant_claim is None:
            raise AuthError(f"token has no tenant claim ({' or '.join(settings.tenant_claims)})")
        tenant = _claim_id(claims, tenant_claim, "tenant")
        plan = _claim_id(claims, settings.plan_claim, "plan")
        user = None
        if settings.user_claim is not None and settings.user_claim in claims:
            user = _claim_id(claims, settings.user_claim, "user")
        credential = claims.get("jti") or claims.get("sub") or tenant
        return Principal(tenant, plan, user, "jwt", str(credential)[:128])


ONE_CREDENTIAL = (
    "send one credential: {header} holds several (a repeated header, or a list); "
    "the gateway will not pick one of them"
)
TWO_HEADERS = (
    "send one credential: Authorization and x-api-key hold different ones; "
    "the gateway will not pick one of them"
)


# HTTP's optional white space (RFC 9110 §5.6.3): str.strip() also took NBSP, NEL and the
# \x1c-\x1f separators for it, so a key with such a byte was served (and refused by nginx).
_OWS = " \t"


def _credential(headers: Mapping[str, str]) -> str:
    """The token of `Authorization: Bearer …`, else of `x-api-key`. `headers` holds repeated
    lines joined by ',' (RFC 9110 §5.3); no key or JWT holds one, so a ',' means two
    credentials, and which one counts is not the gateway's guess: refused."""
    authorization = headers.get("authorization")
    api_key = (headers.get("x-api-key") or "").strip(_OWS)
    if authorization is not None:
        scheme, _, token = authorization.strip(_OWS).partition(" ")
        if scheme.lower() != "bearer" or not token.strip(_OWS):
            raise AuthError("Authorization must be `Bearer <API key or JWT>`")
        token = _one(token.strip(_OWS), "Authorization")
        # The same key in both (some clients send it twice) is one credential; two are not.
        if api_key and api_key != token:
            raise AuthError(TWO_HEADERS)
        return token
    if api_key:
        return _one(api_key, "x-api-key")
    raise AuthError("no credential: send Authorization: Bearer <API key or JWT>")


def _one(token: str, header: str) -> str:
    if "," in token:
        raise AuthError(ONE_CREDENTIAL.format(header=header))
    return token


def _claim_id(claims: Mapping[str, Any], claim: str, what: str) -> str:
    value = claims.get(claim)
    if not isinstance(value, str):
        raise AuthError(f"token claim {claim!r} ({what}) is missing or not a string")
    try:
        return validate_id(value, what)
    except ValueError:
        raise AuthError(
            f"token claim {claim!r} is not a safe {what} id (1-128 of A-Z a-z 0-9 ._:+=~-, "
            "starting with a letter or digit)"
        ) from None


def _reason(exc: jwt.PyJWTError) -> str:
    reasons: list[tuple[type[jwt.PyJWTError] | tuple[()], str]] = [
        (jwt.ExpiredSignatureError, "expired"),
        (jwt.ImmatureSignatureError, "not valid yet (nbf or iat in the future)"),
        (jwt.InvalidAudienceError, "wrong audience"),
        (jwt.InvalidIssuerError, "wrong issuer"),
        (jwt.MissingRequiredClaimError, "a required claim (exp, iat, iss, aud) is missing"),
        (jwt.InvalidIssuedAtError, "iat is not a number"),
        (jwt.InvalidSignatureError, "bad signature"),
        (jwt.InvalidAlgorithmError, "algorithm not accepted"),
        # PyJWT >= 2.10 checks these types too: said, not "malformed token" (the token is
        # well formed and signed; its issuer wrote a number or an object there).
        (getattr(jwt.exceptions, "InvalidSubjectError", ()), "sub is not a string"),
        (getattr(jwt.exceptions, "InvalidJTIError", ()), "jti is not a string"),
    ]
    return next((text for kind, text in reasons if isinstance(exc, kind)), "malformed token")


def _load_public_key(pem: str | None) -> PublicKey | None:
    if pem is None:
        return None
    try:
        key = load_pem_public_key(pem.encode())
    except ValueError as exc:
        raise ConfigurationError(
            f"GOVERNOR_GATEWAY__JWT_PUBLIC_KEY is not a PEM public key ({exc}); give the "
            "issuer's public key (-----BEGIN PUBLIC KEY-----), not a certificate or secret"
        ) from None
    if not isinstance(key, PublicKey):
        raise ConfigurationError(
            f"GOVERNOR_GATEWAY__JWT_PUBLIC_KEY is a {type(key).__name__}: use RSA, EC or Ed25519"
        )
    return key
