"""The runbooks and docs shipped with the package, served by the telemetry port so the
default links of alerts, journal events and problem answers resolve (`docs/deploy.md`)."""

from __future__ import annotations

import re
from pathlib import Path

# In a built wheel the repository's runbooks/ and docs/ are copied under controller/_shipped
# (pyproject.toml, force-include); from a source checkout they are the repository's own.
_PACKAGE = Path(__file__).resolve().parent
_BUILT = _PACKAGE / "_shipped"
_ROOT = _BUILT if _BUILT.is_dir() else _PACKAGE.parent
# Only `/runbooks/…/*.md` and `/docs/*.md` names: no `..`, no other file of the image.
_PAGE = re.compile(r"/(runbooks(?:/procedures)?|docs)/([A-Za-z0-9_-][A-Za-z0-9_.-]*\.md)")
MARKDOWN = "text/markdown; charset=utf-8"


def shipped_page(path: str) -> tuple[int, bytes, str]:
    """(status, body, content type) of GET `path` for a shipped runbook or doc page."""
    found = _PAGE.fullmatch(path)
    page = _ROOT / found[1] / found[2] if found is not None else None
    if page is not None and page.is_file():
        return 200, page.read_bytes(), MARKDOWN
    return 404, f"no shipped page {path}: try /runbooks/README.md\n".encode(), "text/plain"


def is_shipped(path: str) -> bool:
    """Whether GET `path` asks for a shipped page (the telemetry server's one extra route)."""
    return path.startswith(("/runbooks/", "/docs/"))
