"""README.md, docs/ and runbooks/ point only at what the repository holds: every relative
Markdown link resolves to a file (and its #anchor to a heading or an `<a id>` there), and every
backticked repository path (`controller/…`, `tests/…`, …) exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PAGES = sorted(
    [REPO / "README.md", *(REPO / "docs").glob("*.md"), *(REPO / "runbooks").rglob("*.md")]
)
_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_CODE = re.compile(r"`([^`\s]+)`")
_HEADING = re.compile(r"^#+\s+(.*)$", re.MULTILINE)
_ANCHOR = re.compile(r'<a id="([^"]+)"')
_TOP = (
    "controller/",
    "tests/",
    "docs/",
    "deploy/",
    "policies/",
    "runbooks/",
    "benchmarks/",
    ".ci/",
)
# Paths a page names that a checkout does not hold, and why.
_BUILT = {"controller/_shipped/"}  # the wheel's copy of docs/ and runbooks/ (pyproject.toml)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = page.read_text()
    return {_slug(h) for h in _HEADING.findall(text)} | set(_ANCHOR.findall(text))


def _name(page: Path) -> str:
    return str(page.relative_to(REPO))


def _broken_links(page: Path, repo: Path = REPO) -> list[str]:
    broken = []
    for target in _LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https:, mailto: — not the repository's
            continue
        path, _, fragment = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.is_relative_to(repo) or not resolved.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and resolved.suffix == ".md" and fragment not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    return broken


def _missing_paths(page: Path, repo: Path = REPO) -> list[str]:
    missing = []
    for quoted in _CODE.findall(page.read_text()):
        path = quoted.rstrip(".,;").split("::")[0].split(":")[0]
        if not path.startswith(_TOP) or any(c in path for c in "*<>{}$…") or path in _BUILT:
            continue  # not a path, or a pattern or placeholder
        if not (repo / path).exists():
            missing.append(path)
    return missing


def test_the_pages_are_found() -> None:
    names = {_name(page) for page in PAGES}
    assert {"README.md", "docs/architecture.md", "runbooks/README.md"} <= names
    assert len(PAGES) > 20


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_markdown_links_resolve_in_the_repository(page: Path) -> None:
    assert _broken_links(page) == [], f"{_name(page)}: fix or remove these links"


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_backticked_repository_paths_exist(page: Path) -> None:
    assert _missing_paths(page) == [], f"{_name(page)} names paths the repository lacks"


def test_a_broken_link_and_a_missing_path_are_caught(tmp_path: Path) -> None:
    # The checks must be able to fail: a repository of one page with one of each.
    (tmp_path / "controller").mkdir()
    (tmp_path / "controller" / "loop.py").write_text("")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "architecture.md").write_text("# Architecture\n## The tick\n")
    page = tmp_path / "docs" / "page.md"
    page.write_text(
        "[gone](no-such.md) [anchor](architecture.md#no-such-heading) "
        "[ok](architecture.md#the-tick) [out](../../x.md) [web](https://example.org/a.md)\n"
        "`controller/no_such_module.py` `controller/loop.py` `policies/*.yaml`\n"
    )
    assert _broken_links(page, tmp_path) == [
        "no-such.md (no such file)",
        "architecture.md#no-such-heading (no such heading)",
        "../../x.md (no such file)",
    ]
    assert _missing_paths(page, tmp_path) == ["controller/no_such_module.py"]
