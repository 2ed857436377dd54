"""Runbooks: one per alert with Meaning, Impact, Diagnosis, Mitigation; every runbook reachable
from an alert or the index; every `governor` command they quote exists with its options, and
every Kubernetes object they name is one the chart creates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
import yaml

from controller.cli import app
from tests.deploy.chart import NAMESPACE, alert_rules, env, manifests, render, rendered_scenario
from tests.deploy.shell import Command, check_governor, commands, shell_blocks

REPO = Path(__file__).resolve().parents[2]
RUNBOOKS = REPO / "runbooks"
INDEX = RUNBOOKS / "README.md"
SECTIONS = ["Meaning", "Impact", "Diagnosis", "Mitigation"]
LINK = re.compile(r"\]\(([^)#\s]+\.md)(?:#([a-z0-9-]+))?\)")
ALERTS = sorted(
    r["alert"] for r in alert_rules(manifests(render({"prometheusRule": {"enabled": True}})))
)


def _markdown_files() -> list[Path]:
    return sorted(RUNBOOKS.rglob("*.md"))


def _commands() -> list[tuple[Path, Command]]:
    found: list[tuple[Path, Command]] = []
    for path in _markdown_files():
        for line, block in shell_blocks(path.read_text()):
            found.extend((path, command) for command in commands(block, line))
    return found


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^a-z0-9 -]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_has_a_runbook_with_the_four_sections(alert: str) -> None:
    path = RUNBOOKS / f"{alert}.md"
    assert path.is_file(), f"write runbooks/{alert}.md"
    text = path.read_text()
    assert text.splitlines()[0] == f"# {alert}"
    headings = re.findall(r"^## (.+)$", text, flags=re.M)
    assert headings == SECTIONS, f"{path.name}: sections {headings}, want {SECTIONS}"
    bodies = re.split(r"^## .+$", text, flags=re.M)[1:]
    for heading, body in zip(SECTIONS, bodies, strict=True):
        assert len(body.strip()) > 80, f"{path.name}: {heading} is too short to help"
    for heading, body in zip(SECTIONS[2:], bodies[2:], strict=True):
        blocks = [b for _, b in shell_blocks(body)]
        assert blocks, f"{path.name}: {heading} must give commands to run"


def test_every_runbook_is_reachable_from_an_alert_or_the_index() -> None:
    linked = {(INDEX.parent / target).resolve() for target, _ in LINK.findall(INDEX.read_text())}
    for path in _markdown_files():
        if path == INDEX:
            continue
        assert path.stem in ALERTS or path.resolve() in linked, f"{path} is linked from nowhere"
    for alert in ALERTS:
        assert (RUNBOOKS / f"{alert}.md").resolve() in linked, f"index the {alert} runbook"


def test_every_link_between_runbooks_resolves() -> None:
    for path in _markdown_files():
        for target, anchor in LINK.findall(path.read_text()):
            linked = (path.parent / target).resolve()
            assert linked.is_file(), f"{path.name} links to missing {target}"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.M)
                assert anchor in {_anchor(h) for h in headings}, f"{path.name}: #{anchor}"


def test_the_policies_runbook_annotations_exist() -> None:
    for policy in sorted((REPO / "policies").glob("*.yaml")):
        for doc in yaml.safe_load_all(policy.read_text()):
            runbook = (doc or {}).get("metadata", {}).get("annotations", {}).get("runbook")
            if runbook:
                assert (REPO / runbook).is_file(), f"{policy.name}: runbook {runbook} missing"


def test_every_quoted_governor_command_exists_with_its_options() -> None:
    root = typer.main.get_command(app)
    quoted = [(path, cmd) for path, cmd in _commands() if cmd.governor_args() is not None]
    assert len(quoted) > 50, "the runbooks should quote the commands to run"
    problems = []
    for path, cmd in quoted:
        args = cmd.governor_args()
        assert args is not None
        problem = check_governor(root, args)
        if problem:
            problems.append(f"{path.relative_to(REPO)}:{cmd.line}: {problem}")
    assert problems == []
    used = {
        " ".join(a for a in (cmd.governor_args() or ())[:2] if not a.startswith("-"))
        for _, cmd in quoted
    }
    for needed in ("override set", "override clear", "freeze", "unfreeze", "explain"):
        assert any(u.startswith(needed) for u in used), f"no runbook shows `governor {needed}`"


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("override", "set", "global/requests_per_second", "100"), "--ttl"),
        (("audit", "tail", "--lines-max", "5"), "--lines-max"),
        (("limits", "show"), "show"),
        (("override", "set", "a/b", "many", "--ttl", "1h", "--reason", "x"), "value"),
        (("signals", "extra"), "extra"),
    ],
)
def test_the_command_check_rejects_what_the_cli_would(args: tuple[str, ...], error: str) -> None:
    problem = check_governor(typer.main.get_command(app), args)
    assert problem is not None
    assert error in problem


def test_the_command_parser_splits_pipelines_and_continuations() -> None:
    block = "$ governor audit tail --json | grep drift && governor limits get \\\n  global/"
    assert [c.words for c in commands(block, 1)] == [
        ("governor", "audit", "tail", "--json"),
        ("grep", "drift"),
        ("governor", "limits", "get", "global/"),
    ]
    exec_form = commands("kubectl -n governor exec deploy/governor -- governor explain x", 1)
    assert exec_form[0].governor_args() == ("explain", "x")


_ALIASES = {"deploy": "deployment", "svc": "service", "cm": "configmap"}


def _named_objects(words: tuple[str, ...], resource_words: set[str]) -> list[tuple[str, str]]:
    """(kind, name) of every object a kubectl command names: `kind/name` or `kind name`."""
    found = []
    for index, word in enumerate(words):
        kind, _, name = word.partition("/")
        if not (name and kind in resource_words):
            if word not in resource_words or index + 1 >= len(words):
                continue
            kind, name = word, words[index + 1]
        if not name.startswith(("-", "<")) and "/" not in name:
            found.append((_ALIASES.get(kind, kind), name))
    return found


def test_kubectl_commands_name_objects_the_chart_creates() -> None:
    docs = rendered_scenario("gateway-values.yaml")[1]  # the controller's and the gateway's
    names: dict[str, set[str]] = {}
    for doc in docs:
        names.setdefault(doc["kind"].lower(), set()).add(doc["metadata"]["name"])
    names["lease"] = {env(docs)["GOVERNOR_LEADER__LEASE_NAME"]["value"]}
    resource_words = set(names) | set(_ALIASES)
    labels = docs[0]["metadata"]["labels"]
    checked = 0
    for path, cmd in _commands():
        words = cmd.words
        if words[:1] != ("kubectl",) or "-A" in words:
            continue
        if "-n" in words:
            assert words[words.index("-n") + 1] == NAMESPACE, f"{path.name}:{cmd.line}"
        for kind, name in _named_objects(words, resource_words):
            assert name in names.get(kind, set()), f"{path.name}:{cmd.line}: no {kind} {name}"
            checked += 1
        for selector in (w for i, w in enumerate(words) if i and words[i - 1] == "-l"):
            key, _, value = selector.partition("=")
            if key.startswith("app.kubernetes.io/name") and "governor" in value:
                assert labels[key] == value
    assert checked > 10


def test_the_alias_in_the_index_runs_the_cli_in_the_deployment() -> None:
    docs = rendered_scenario("default")[1]
    deployment = next(d for d in docs if d["kind"] == "Deployment")["metadata"]["name"]
    text = INDEX.read_text()
    assert (
        f"alias governor='kubectl -n {NAMESPACE} exec -i deploy/{deployment} -- governor'" in text
    )
