"""URLs shown safely: the password is masked (a userinfo without one, whole); scheme, user,
host, port, path stay."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

from controller.logging import MASK

# A query parameter that carries a password (a Sentinel URL's `sentinel_password`).
_QUERY_PASSWORD = re.compile(r"(^|&)([^=&]*password=)[^&]*")


def mask_url(url: str) -> str:
    """`url` with its userinfo password and any `…password=` query value replaced by the
    mask; a userinfo without a ':' is masked whole, as clients read a lone `secret@` as the
    password or a token (`redis://secret@host`, `https://TOKEN@host`); a URL without any of
    these is returned as is (a host is no secret)."""
    parts = urlsplit(url)
    # rpartition: the host list follows the last '@' (a password may hold '@' unencoded).
    userinfo, at, hosts = parts.netloc.rpartition("@")
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:{MASK}@{hosts}"
    elif at and userinfo:
        netloc = f"{MASK}@{hosts}"
    query = _QUERY_PASSWORD.sub(lambda m: f"{m[1]}{m[2]}{MASK}", parts.query)
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))
