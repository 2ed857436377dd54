"""Logging: structlog JSON lines, secrets masked (SecretStr, secret-named keys, URL passwords)."""

from __future__ import annotations

import functools
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog
from pydantic import SecretStr

MASK = "**********"
# `token(?!s)`: a bearer or admin token is a secret, a count of tokens (`tokens`,
# `max_tokens`, `tokens_per_minute`) is what an operator reads the line for.
_SECRET_KEY = re.compile(
    r"pass(word|wd)?|secret|token(?!s)|authorization|api[_-]?key|credential|cookie",
    re.IGNORECASE,
)
# The password runs to the last '@' of the word: it may hold '/', '?' or '#' unencoded (base64
# ones hold '/'), where a URL parser would end the host.
_URL_PASSWORD = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):\S+@")
# A userinfo without a ':' (`redis://secret@host`, `https://TOKEN@host`): clients read it as
# the password or a token, so it is masked whole.
_URL_LONE_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^:/@\s]+@")
_QUERY_PASSWORD = re.compile(r"([?&][a-z_]*password=)[^&\s]+")


def mask_text(text: str) -> str:
    """Hide the password of any `scheme://user:password@` URL inside `text`, the whole
    userinfo of a `scheme://secret@` one, and a URL's `...password=` query parameter (a
    Sentinel URL's `sentinel_password`)."""
    if "@" in text:
        text = _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:{MASK}@", text)
        text = _URL_LONE_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    if "password=" in text:  # rare: skip the regex for every journal line
        text = _QUERY_PASSWORD.sub(lambda m: f"{m[1]}{MASK}", text)
    return text


# Values that cannot hold a secret, checked first: most of a journal line is numbers.
_PLAIN = frozenset({int, float, bool, type(None)})


def _redact(value: Any) -> Any:
    if type(value) in _PLAIN:
        return value
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, dict):
        return {k: MASK if _is_secret_key(k) else _redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    if isinstance(value, SecretStr):
        return MASK
    if isinstance(value, BaseException):
        return mask_text(str(value))
    return value


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and _secret_name(key)


@functools.lru_cache(maxsize=1024)
def _secret_name(key: str) -> bool:
    """Log keys are a small fixed set: each is matched once."""
    return bool(_SECRET_KEY.search(key))


def redact_secrets(
    _logger: object, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secrets wherever they hide in an event."""
    for key, value in list(event_dict.items()):
        event_dict[key] = MASK if _is_secret_key(key) else _redact(value)
    return event_dict


class _CurrentStream:
    """Writes to whatever sys.stdout/sys.stderr is at write time (test runners swap them)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def write(self, text: str) -> int:
        stream: TextIO = getattr(sys, self.name)
        return stream.write(text)

    def flush(self) -> None:
        getattr(sys, self.name).flush()


def configure_logging(level: str = "info", stream: TextIO | str = "stdout") -> None:
    """JSON lines to `stream` ("stdout", "stderr" or a file object), secrets masked.

    The daemon logs to stdout; the CLI to stderr, so `--json` output stays parseable.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"log level {level!r} is not one of debug, info, warning, error")
    target = _CurrentStream(stream) if isinstance(stream, str) else stream
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact_secrets,
            structlog.processors.JSONRenderer(sort_keys=True),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=target),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
