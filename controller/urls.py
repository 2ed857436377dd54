"""URLs shown safely: the password is masked (a userinfo without one, whole); scheme, user,
host, port, path stay."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from controller.logging import MASK

# A query parameter that carries a password (a Sentinel URL's `sentinel_password`).
_QUERY_PASSWORD = re.compile(r"(^|&)([^=&]*password=)[^&]*")
# The scheme and up to two slashes, also when mistyped (`redis:/`, `redis:`): a mistyped URL
# is the one most likely to be printed (in the error refusing it), so it must be masked too.
# A `redis//` one (no ':') is no scheme: its userinfo then begins at the start.
_PREFIX = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.-]*:)?/{0,2}")
# Any `…password=` query value (it may hold '@' of its own), left out when looking for an '@'.
_ANY_QUERY_PASSWORD = re.compile(r"[?&][^=&?]*password=[^&]*")

# Why a URL whose password ends the host too soon is refused (the one wording for all URLs).
UNENCODED_PASSWORD = (
    "the password holds '/', '?' or '#' unencoded, which end the host: percent-encode them "
    "(%2F, %3F, %23; '@' as %40)"
)


def cut_password(url: str) -> bool:
    """Whether `url`'s password holds '/', '?' or '#' unencoded: an '@' lies past the host
    urlsplit reads, so a piece of the password would be read (and named in a refusal) as
    the port, host or path."""
    rest = _ANY_QUERY_PASSWORD.sub("", url.partition("://")[2])
    if rest.startswith("/"):  # no authority (unix:///run/redis@6379.sock): no password
        return False
    return "@" in rest and "@" not in urlsplit(url).netloc


def mask_url(url: str) -> str:
    """`url` with its userinfo password and any `…password=` query value replaced by the
    mask; a userinfo without a ':' is masked whole, as clients read a lone `secret@` as the
    password or a token (`redis://secret@host`, `https://TOKEN@host`); a URL without any of
    these is returned as is (a host is no secret)."""
    prefix = _PREFIX.match(url)
    start = prefix.end() if prefix else 0
    rest = url[start:]
    # The userinfo ends at the last '@', not where urlsplit ends the host: a password may
    # hold '@', '/', '?' or '#' unencoded (base64 ones hold '/'). A rest that begins with
    # '/' has an empty authority (unix:///path@x.sock): no userinfo.
    userinfo, at, hosts = ("", "", rest) if rest.startswith("/") else rest.rpartition("@")
    if at and ":" in userinfo:
        userinfo = f"{userinfo.partition(':')[0]}:{MASK}"
    elif at and userinfo:
        userinfo = MASK
    path, mark, query = hosts.partition("?")
    query = _QUERY_PASSWORD.sub(lambda m: f"{m[1]}{m[2]}{MASK}", query)
    return f"{url[:start]}{userinfo}{at}{path}{mark}{query}"
