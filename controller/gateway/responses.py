"""What the gateway answers: problem+json refusals and the rate-limit headers of every answer."""

from __future__ import annotations

import datetime as dt
import math
import random
import time
from collections.abc import Sequence
from typing import Any

from starlette.responses import JSONResponse

from controller.gateway.admission import AdmissionResult, Budget, Degrade

PROBLEM_JSON = "application/problem+json"
# IANA problem types of draft-ietf-httpapi-ratelimit-headers (section "Problem Types").
QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
_SHED_RETRY_SECONDS = 5.0  # the controller re-decides every few seconds


def problem(
    status: int,
    type_uri: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    **extensions: Any,
) -> JSONResponse:
    """An RFC 9457 problem document (`application/problem+json`)."""
    body = {"type": type_uri, "title": title, "status": status, "detail": detail, **extensions}
    return JSONResponse(body, status_code=status, headers=headers, media_type=PROBLEM_JSON)


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
        return str(max(1, math.ceil(seconds * (1.0 + self.rng.uniform(0.0, self.jitter)))))

    def unauthenticated(self, detail: str) -> JSONResponse:
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
        )

    def model_not_allowed(self, plan: str, model: str, allowed: Sequence[str]) -> JSONResponse:
        return problem(
            403,
            self.type_uri("model-not-allowed"),
            "Model not allowed on this plan",
            f"plan {plan!r} may call {', '.join(allowed)}; not {model!r}",
            plan=plan,
            model=model,
            allowed_models=list(allowed),
        )

    def unknown_plan(self, plan: str) -> JSONResponse:
        """403: the credential names a plan the published catalog does not hold (a typo, or a
        plan since removed from the policies); never served as if it had no limits."""
        return problem(
            403,
            self.type_uri("unknown-plan"),
            "Unknown plan",
            f"plan {plan!r} is not in the plan catalog; the API's operator must move this "
            "tenant or key to a known plan (governor tenants list flags them)",
            plan=plan,
        )

    def not_configured(self) -> JSONResponse:
        """503: no plan catalog or no limits in the store yet (the controller has not
        published them); nothing is served unrestricted meanwhile."""
        return problem(
            503,
            self.type_uri("not-configured"),
            "Limits not configured yet",
            "no plan catalog or limits are published yet (the controller has not completed "
            "its first tick); retry later",
            {"Retry-After": self.retry_after(_SHED_RETRY_SECONDS)},
        )

    def bad_request(self, detail: str, status: int = 400) -> JSONResponse:
        return problem(status, self.type_uri("bad-request"), "Bad request", detail)

    def refused(self, result: AdmissionResult) -> JSONResponse:
        """The answer to an admission that said no: 429, 402, 503, 403 (unknown plan) or 400
        (too large)."""
        if result.outcome == "unknown_plan":
            return self.unknown_plan((result.denied_by or "plan/").partition("/")[2])
        if result.outcome == "not_configured":
            return self.not_configured()
        headers = rate_limit_headers(result)
        if result.outcome == "budget_exhausted":
            return self._budget_exhausted(result, headers)
        address = result.denied_by or "unknown"
        if result.outcome == "too_large":
            return problem(
                400,
                self.type_uri("request-too-large"),
                "Request can never fit",
                f"its worst case (prompt estimate + max_tokens) is above {address}; "
                "lower max_tokens or the prompt",
                headers,
                **{"violated-policies": [address]},
            )
        if result.outcome == "shed":
            headers["Retry-After"] = self.retry_after(result.retry_after or _SHED_RETRY_SECONDS)
            return problem(
                503,
                REDUCED_CAPACITY,
                "Temporarily shed",
                f"the controller has shed this traffic ({address} is 0); retry later",
                headers,
                **{"violated-policies": [address]},
            )
        wait = result.retry_after if result.retry_after is not None else 1.0
        headers["Retry-After"] = self.retry_after(wait)
        return problem(
            429,
            QUOTA_EXCEEDED,
            "Rate limit exceeded",
            f"{address} is used up; retry in {math.ceil(wait)} s",
            headers,
            **{"violated-policies": [address]},
        )

    def _budget_exhausted(self, result: AdmissionResult, headers: dict[str, str]) -> JSONResponse:
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
            headers["Retry-After"] = str(max(1, math.ceil(result.retry_after)))
        return problem(
            402,
            self.type_uri("budget-exhausted"),
            "Budget exhausted",
            _budget_detail(address, budget),
            headers,
            **extensions,
        )

    def enforcement_unavailable(self, plan: str | None) -> JSONResponse:
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
            {"Retry-After": self.retry_after(_SHED_RETRY_SECONDS)},
        )

    def locally_limited(self, address: str, wait: float) -> JSONResponse:
        return problem(
            429,
            QUOTA_EXCEEDED,
            "Rate limit exceeded",
            f"{address} (this gateway's share while the limit store is unreachable) is used "
            f"up; retry in {math.ceil(wait)} s",
            {"Retry-After": self.retry_after(wait)},
            **{"violated-policies": [address]},
        )

    def upstream_failed(self, detail: str, status: int = 502) -> JSONResponse:
        title = "Upstream timed out" if status == 504 else "Upstream unavailable"
        return problem(status, self.type_uri("upstream-failed"), title, detail)


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
    """IETF RateLimit/RateLimit-Policy (draft-ietf-httpapi-ratelimit-headers-10) and OpenAI's
    x-ratelimit-{limit,remaining,reset}-{requests,tokens} for the tightest quotas."""
    policies: list[str] = []
    states: list[str] = []
    headers: dict[str, str] = {}
    for quota, unit in ((result.requests, "requests"), (result.tokens, "tokens")):
        if quota is None:
            continue
        policies.append(_policy(quota.address, quota.limit, quota.window_seconds, unit))
        states.append(_state(quota.address, quota.remaining, quota.reset_seconds))
        headers[f"x-ratelimit-limit-{unit}"] = str(_count(quota.limit))
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


def degrade_headers(degrade: Degrade) -> dict[str, str]:
    """Say what was changed in the request and why."""
    changes = []
    if degrade.model is not None:
        changes.append(f"model={degrade.model}")
    if degrade.max_tokens is not None:
        changes.append(f"max_tokens={degrade.max_tokens}")
    return {"x-governor-degraded": ";".join(changes), "x-governor-degraded-reason": degrade.reason}
