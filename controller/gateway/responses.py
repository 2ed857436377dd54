"""What the gateway answers: refusals (OpenAI's error envelope, or problem+json when asked)
and the rate-limit headers of every answer."""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from controller.gateway.admission import AdmissionResult, Budget, Degradation, Quota
from controller.model import validate_id

PROBLEM_JSON = "application/problem+json"
# IANA problem types of draft-ietf-httpapi-ratelimit-headers (section "Problem Types").
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
_SHED_RETRY_SECONDS = 5.0  # the controller re-decides every few seconds


@dataclass(frozen=True)
class OpenAIError:
    """What OpenAI-compatible clients read from `{"error": {...}}`: `e.type`, `e.code`,
    `e.param` (docs/gateway.md, "Refusals")."""

    type: str
    code: str
    param: str | None = None


class Problem(Response):
    """An RFC 9457 problem: rendered as OpenAI's error envelope (what every OpenAI SDK parses)
    unless the client's Accept names `application/problem+json`. `body` is the problem+json."""

    def __init__(
        self,
        status: int,
        document: dict[str, Any],
        error: OpenAIError,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.document = document
        self.error = error
        self.extra_headers = dict(headers or {})
        rendered = JSONResponse(document).body
        super().__init__(rendered, status, self.extra_headers, PROBLEM_JSON)

    def envelope(self) -> dict[str, Any]:
        """`{"error": {message, type, code, param, ...the problem's other fields}}`; the
        problem's `type` URI is kept as `problem_type`, its `detail` is the message."""
        error = self.error
        fields = {"message": self.document["detail"], "type": error.type, "code": error.code,
                  "param": error.param, "problem_type": self.document["type"]}  # fmt: skip
        rest = {k: v for k, v in self.document.items() if k not in ("detail", "type")}
        return {"error": {**rest, **fields}}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if wants_problem_json(scope):
            await super().__call__(scope, receive, send)
            return
        openai = JSONResponse(self.envelope(), self.status_code, self.extra_headers)
        await openai(scope, receive, send)


def safe_id(value: str) -> bool:
    """An id that may be put in a key, and quoted back (no quote, no control character)."""
    try:
        validate_id(value)
    except ValueError:
        return False
    return True


def wants_problem_json(scope: Scope) -> bool:
    """Whether the client's Accept names problem+json (then it gets RFC 9457 documents)."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"accept" and PROBLEM_JSON.encode() in value.lower():
            return True
    return False


def problem(
    status: int,
    type_uri: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    *,
    error: OpenAIError,
    **extensions: Any,
) -> Problem:
    """An RFC 9457 problem document, and what it is in OpenAI's terms."""
    body = {"type": type_uri, "title": title, "status": status, "detail": detail, **extensions}
    return Problem(status, body, error, headers)


UNMETERED_ROUTE = (
    "this gateway serves POST /v1/chat/completions, /v1/completions, /v1/embeddings and "
    "/v1/responses (metered), GET /v1/models, the Conversations API (a tenant's own "
    "/v1/conversations) and a tenant's own stored responses (/v1/responses/{id}); any other "
    "route could spend model work that no limit counts, so it is not forwarded"
)


def _invalid(code: str, param: str | None = None) -> OpenAIError:
    return OpenAIError("invalid_request_error", code, param)


def _server(code: str) -> OpenAIError:
    return OpenAIError("server_error", code)


def _rate_limited(address: str) -> OpenAIError:
    # OpenAI's rate-limit errors say which quota ran out in `type`: requests or tokens.
    return OpenAIError("tokens" if "tokens" in address else "requests", "rate_limit_exceeded")


class Answers:
    """Renders every refusal the same way, with type URIs under one documentation base."""

    def __init__(self, base_url: str, jitter: float, rng: random.Random | None = None) -> None:
        self.base_url = base_url
        self.jitter = jitter
        self.rng = rng or random.Random()

    def type_uri(self, anchor: str) -> str:
        return f"{self.base_url}#{anchor}"

    def retry_after(self, seconds: float) -> str:
        """Delay-seconds grown by a random share (≤ jitter) so refused clients do not return
        in lockstep; never below the true wait, never 0."""
        return self.retry_headers(seconds)["Retry-After"]

    def retry_headers(self, seconds: float, jitter: bool = True) -> dict[str, str]:
        """Retry-After (whole seconds, never 0) and retry-after-ms (which the OpenAI SDKs read
        first): a wait of 30 ms is not announced as a whole second only."""
        grown = seconds * (1.0 + self.rng.uniform(0.0, self.jitter)) if jitter else seconds
        return {
            "Retry-After": str(max(1, math.ceil(grown))),
            "retry-after-ms": str(max(1, math.ceil(grown * 1000))),
        }

    def unauthenticated(self, detail: str) -> Problem:
        # RFC 6750: the challenge names the scheme and the error; the quote-free detail is safe.
        description = detail.replace('"', "'").replace("\\", "/")
        # Header values must be latin-1: a detail quoting a token or written with "…" must not
        # turn a 401 into a 500.
        description = description.encode("ascii", "replace").decode("ascii")
        challenge = f'Bearer error="invalid_token", error_description="{description}"'
        return problem(
            401,
            self.type_uri("unauthenticated"),
            "Unauthenticated",
            detail,
            headers={"WWW-Authenticate": challenge},
            error=_invalid("invalid_api_key"),
        )

    def model_not_allowed(self, plan: str, model: str, allowed: Sequence[str]) -> Problem:
        return problem(
            403,
            self.type_uri("model-not-allowed"),
            "Model not allowed on this plan",
            f"plan {plan!r} may call {', '.join(allowed)}; not {model!r}",
            error=_invalid("model_not_allowed", "model"),
            plan=plan,
            model=model,
            allowed_models=list(allowed),
        )

    def unknown_plan(self, plan: str, claimed: bool = False) -> Problem:
        """403: the credential names a plan the published catalog does not hold (a typo, or a
        plan since removed from the policies); never served as if it had no limits.
        `claimed`: a token's plan claim, which only its issuer can change."""
        remedy = (
            "(the token's plan claim) is not in the plan catalog; the token's issuer must name "
            "a known plan"
            if claimed
            else "is not in the plan catalog; the API's operator must move this tenant or key "
            "to a known plan (governor tenants list flags them)"
        )
        return problem(
            403,
            self.type_uri("unknown-plan"),
            "Unknown plan",
            f"plan {plan!r} {remedy}",
            error=_invalid("unknown_plan"),
            plan=plan,
        )

    def unmetered_route(self) -> Problem:
        """404: a route the gateway neither meters nor passes: forwarded, it could spend model
        work no limit counts (an upstream's /v1/score, /v1/rerank, /invocations)."""
        return problem(
            404,
            self.type_uri("unmetered-route"),
            "Route not served",
            UNMETERED_ROUTE,
            error=_invalid("unknown_route"),
        )

    def unknown_earlier(self, what: str, named: str, in_path: bool = False) -> Problem:
        """404: a `previous_response_id` (`what` "response") or `conversation` this gateway
        holds no record of for the caller's tenant. The same words whether the id is unknown,
        expired or another tenant's (nothing tells them apart); an id that is no safe id is
        not quoted back. `in_path`: a path names it (no `param`; a response so named is no
        previous response: `response_not_found`)."""
        shown = f"'{named}'" if safe_id(named) else "with that id"
        # OpenAI's own code for a previous response it does not hold; the same form for the other.
        param: str | None = "previous_response_id"
        code = "previous_response_not_found"
        if what != "response":
            param, code = ("conversation", "conversation_not_found")
        if in_path:
            param = None
            code = "response_not_found" if what == "response" else code
        return problem(
            404,
            self.type_uri("unknown-" + what),
            f"Unknown {what}",
            f"no {what} {shown} for this API key",
            error=_invalid(code, param),
        )

    def not_configured(self) -> Problem:
        """503: no plan catalog or no limits in the store yet (the controller has not
        published them); nothing is served unrestricted meanwhile."""
        return problem(
            503,
            self.type_uri("not-configured"),
            "Limits not configured yet",
            "no plan catalog or limits are published yet (the controller has not completed "
            "its first tick); retry later",
            self.retry_headers(_SHED_RETRY_SECONDS),
            error=_server("not_configured"),
        )

    def corrupt_state(self, damage: str) -> Problem:
        """503: a counter this request is checked against holds what no script writes (a
        hand edit): its true count is unknown, so nothing is served until it is repaired."""
        return problem(
            503,
            self.type_uri("corrupt-state"),
            "Limit state damaged",
            f"the limits cannot be checked: {damage}",
            self.retry_headers(_SHED_RETRY_SECONDS),
            error=_server("corrupt_state"),
        )

    def bad_request(self, detail: str, status: int = 400, param: str | None = None) -> Problem:
        return problem(
            status,
            self.type_uri("bad-request"),
            "Bad request",
            detail,
            error=_invalid("bad_request", param),
        )

    def refused(self, result: AdmissionResult, insufficient_quota: bool = False) -> Problem:
        """The answer to an admission that said no: 429, 402 (or 429 insufficient_quota when
        the plan says so), 503, 403 (unknown plan) or 400 (too large)."""
        if result.outcome == "unknown_plan":
            return self.unknown_plan((result.denied_by or "plan/").partition("/")[2])
        if result.outcome == "not_configured":
            return self.not_configured()
        if result.outcome == "corrupt_state":
            return self.corrupt_state(result.damage or "a limit counter is damaged")
        headers = rate_limit_headers(result)
        if result.outcome == "budget_exhausted":
            return self._budget_exhausted(result, headers, insufficient_quota)
        address = result.denied_by or "unknown"
        violated = {"violated-policies": [address]}
        if result.outcome == "too_large":
            # No Retry-After: waiting never makes it fit.
            return problem(
                400,
                self.type_uri("request-too-large"),
                "Request can never fit",
                f"its worst case (prompt estimate + max_tokens) is above {address}; "
                "lower max_tokens or the prompt",
                headers,
                error=_invalid("request_too_large", "max_tokens"),
                **violated,
            )
        if result.outcome == "shed":
            headers.update(self.retry_headers(result.retry_after or _SHED_RETRY_SECONDS))
            return problem(
                503,
                REDUCED_CAPACITY,
                "Temporarily shed",
                f"the controller has shed this traffic ({address} is 0); retry later",
                headers,
                error=_server("temporarily_shed"),
                **violated,
            )
        wait = result.retry_after if result.retry_after is not None else 1.0
        headers.update(self.retry_headers(wait))
        return problem(
            429,
            QUOTA_EXCEEDED,
            "Rate limit exceeded",
            f"{address} is used up; retry in {math.ceil(wait)} s",
            headers,
            error=_rate_limited(address),
            **violated,
        )

    def _budget_exhausted(
        self, result: AdmissionResult, headers: dict[str, str], insufficient_quota: bool
    ) -> Problem:
        """402, or OpenAI's own answer to a spent quota (429 insufficient_quota) when the plan
        chose it (`quota_exhausted: insufficient_quota`)."""
        budget = result.budget
        address = result.denied_by or (budget.address if budget else "unknown")
        extensions: dict[str, Any] = {"budget": address}
        if budget is not None:
            extensions.update(kind=budget.kind, remaining=budget.remaining, limit=budget.limit)
            if budget.resets_at is not None:
                extensions["resets_at"] = _iso(budget.resets_at)
            if budget.kind == "credits":
                extensions["ledger"] = budget.address
        if result.retry_after is not None:
            headers.update(self.retry_headers(result.retry_after, jitter=False))
        # A spent budget is not for an automatic retry: Retry-After says when a daily budget
        # resets (credits never refill by themselves), and the OpenAI Node SDK would sleep
        # until then on a 429 insufficient_quota. The OpenAI SDKs obey this header.
        headers["x-should-retry"] = "false"
        status = 429 if insufficient_quota else 402
        code = "insufficient_quota" if insufficient_quota else "budget_exhausted"
        return problem(
            status,
            self.type_uri("budget-exhausted"),
            "Budget exhausted",
            _budget_detail(address, budget),
            headers,
            error=OpenAIError("insufficient_quota", code),
            **extensions,
        )

    def enforcement_unavailable(self, plan: str | None) -> Problem:
        """503 while Redis is away: the plan fails closed, or (no plan) the credential could
        not be checked."""
        detail = (
            f"the limit store is unreachable and plan {plan!r} fails closed; retry later"
            if plan is not None
            else "the limit store is unreachable and this API key was not seen before; retry"
        )
        return problem(
            503,
            self.type_uri("enforcement-unavailable"),
            "Limits cannot be checked",
            detail,
            self.retry_headers(_SHED_RETRY_SECONDS),
            error=_server("enforcement_unavailable"),
        )

    def locally_limited(self, address: str, wait: float) -> Problem:
        return problem(
            429,
            QUOTA_EXCEEDED,
            "Rate limit exceeded",
            f"{address} (this gateway's share while the limit store is unreachable) is used "
            f"up; retry in {math.ceil(wait)} s",
            self.retry_headers(wait),
            error=_rate_limited(address),
            **{"violated-policies": [address]},
        )

    def upstream_failed(self, detail: str, status: int = 502) -> Problem:
        title = "Upstream timed out" if status == 504 else "Upstream unavailable"
        return problem(
            status,
            self.type_uri("upstream-failed"),
            title,
            detail,
            error=_server("upstream_failed"),
        )


def _budget_detail(address: str, budget: Budget | None) -> str:
    if budget is None:
        return f"{address} is spent"
    if budget.kind == "credits":
        return (
            f"the credit ledger {budget.address} holds {budget.remaining:.4f} USD, below what "
            "this plan requires; top it up (governor credits top-up)"
        )
    when = f"; it resets at {_iso(budget.resets_at)}" if budget.resets_at is not None else ""
    return f"{address} has {max(0, math.floor(budget.remaining))} tokens left{when}"


def _iso(timestamp: float) -> str:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def rate_limit_headers(result: AdmissionResult) -> dict[str, str]:
    """IETF RateLimit/RateLimit-Policy (draft-ietf-httpapi-ratelimit-headers-10), each quota
    with its own window, and OpenAI's x-ratelimit-{limit,remaining,reset}-{requests,tokens}
    for the tightest quotas: the limit per minute (as OpenAI clients read it), what may be
    sent now, and the time until the quota is full again."""
    policies: list[str] = []
    states: list[str] = []
    headers: dict[str, str] = {}
    for quota, unit in ((result.requests, "requests"), (result.tokens, "tokens")):
        if quota is None:
            continue
        policies.append(_policy(quota.address, quota.limit, quota.window_seconds, unit))
        states.append(_state(quota.address, quota.remaining, quota.reset_seconds))
        headers[f"x-ratelimit-limit-{unit}"] = str(_count(per_minute(quota)))
        headers[f"x-ratelimit-remaining-{unit}"] = str(_count(quota.remaining))
        headers[f"x-ratelimit-reset-{unit}"] = openai_duration(quota.reset_seconds)
    budget = result.budget
    if budget is not None and budget.kind == "tokens" and budget.limit is not None:
        policies.append(_policy(budget.address, budget.limit, 86400.0, "tokens"))
        # A hint only: seconds to the reset by this host's clock (the budget runs on Redis's).
        reset = None if budget.resets_at is None else max(0.0, budget.resets_at - time.time())
        states.append(_state(budget.address, budget.remaining, reset))
    if policies:
        headers["RateLimit-Policy"] = ", ".join(policies)
        headers["RateLimit"] = ", ".join(states)
    return headers


def per_minute(quota: Quota) -> float:
    """A rate quota's limit per minute: OpenAI's x-ratelimit-limit-* are requests or tokens
    per minute, so 5 requests/second is 300 (a concurrency limit has no window: as is)."""
    if quota.window_seconds <= 0:
        return quota.limit
    return quota.limit * 60.0 / quota.window_seconds


def _policy(address: str, limit: float, window: float, unit: str) -> str:
    # "requests" is the draft's default unit. "tokens" is not in its registry yet: a client
    # that does not know it must not read a token quota as a request quota, so it is named.
    unit_parameter = "" if unit == "requests" else f';qu="{unit}"'
    return f'"{address}";q={_count(limit)}{unit_parameter};w={max(1, round(window))}'


def _state(address: str, remaining: float, reset: float | None) -> str:
    text = f'"{address}";r={_count(remaining)}'
    return text if reset is None else f"{text};t={max(0, math.ceil(reset))}"


def _count(value: float) -> int:
    return max(0, math.floor(value)) if math.isfinite(value) else 0


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def degrade_headers(degrade: Degradation) -> dict[str, str]:
    """Say what was changed in the request and why."""
    changes = []
    if degrade.model is not None:
        changes.append(f"model={degrade.model}")
    if degrade.max_tokens is not None:
        changes.append(f"max_tokens={degrade.max_tokens}")
    return {"x-governor-degraded": ";".join(changes), "x-governor-degraded-reason": degrade.reason}
