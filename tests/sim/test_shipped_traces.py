"""The Azure traces ship inside the package (gzipped, credited): scenarios name them
`shipped:<name>`, nothing reads outside the repository, and an installed wheel simulates
`azure-conv-3x` from its own copy."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from controller.sim.compare import load_trace
from controller.sim.scenario import ScenarioError, find_scenario, load_scenario, scenario_names
from controller.sim.trace import SHIPPED, open_trace, read_trace
from tests.sim.conftest import AZURE_CONV, AZURE_DATA, POLICIES, REPO


def _rows(path: Path) -> int:
    """Requests in a gzipped CSV, counted apart from the reader under test."""
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    return sum(1 for line in lines[1:] if line.strip())


def test_a_shipped_name_reads_the_packaged_copy() -> None:
    shipped = open_trace("shipped:azure-conv-2023")
    by_path = read_trace(AZURE_CONV)
    assert shipped.source == "shipped:azure-conv-2023"
    assert np.array_equal(shipped.offsets, by_path.offsets)
    assert np.array_equal(shipped.prompt, by_path.prompt)
    assert np.array_equal(shipped.output, by_path.output)
    for name, file in SHIPPED.items():
        assert len(open_trace(f"shipped:{name}").offsets) == _rows(AZURE_DATA / file)
    # The published sizes (AzurePublicDataset, 2023-11-16): 19,366 and 8,819 requests.
    assert len(shipped.offsets) == 19_366
    assert len(open_trace("shipped:azure-code-2023").offsets) == 8_819


def test_every_shipped_scenario_trace_is_inside_the_package() -> None:
    traced = 0
    for name in scenario_names():
        scenario = load_scenario(name)
        if scenario.trace is None:
            continue
        traced += 1
        assert scenario.trace.file.startswith("shipped:"), (name, scenario.trace.file)
        data = load_trace(scenario, find_scenario(name))
        assert data is not None
        assert data.source == scenario.trace.file
    assert traced >= 1  # azure-conv-3x


def test_bad_trace_names_and_files_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match=r"no shipped trace 'nope'.*shipped:azure-conv-2023"):
        open_trace("shipped:nope")
    damaged = tmp_path / "damaged.csv.gz"
    damaged.write_bytes(b"\x1f\x8b not gzip at all")
    with pytest.raises(ScenarioError, match=r"damaged\.csv\.gz: not a readable trace"):
        read_trace(damaged)
    with pytest.raises(ScenarioError, match=r"trace file 'absent\.csv' not found"):
        open_trace("absent.csv")
    # A user's own gzipped trace is read like the shipped ones.
    good = tmp_path / "mine.csv.gz"
    good.write_bytes(
        gzip.compress(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,374,44\n")
    )
    assert read_trace(good).prompt.tolist() == [374.0]


def test_the_credit_sits_beside_the_data() -> None:
    credit = (AZURE_DATA / "README.md").read_text(encoding="utf-8")
    for needed in ("Patel", "Splitwise", "ISCA 2024", "CC BY 4.0", "AzurePublicDataset"):
        assert needed in credit
    for file in SHIPPED.values():
        assert file in credit


def test_an_installed_wheel_simulates_azure_conv_3x_from_its_own_copy(tmp_path: Path) -> None:
    built = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(tmp_path / "dist")],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = (tmp_path / "dist").glob("governor-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(site)  # what an installer puts in site-packages
    data = "controller/data/azure-llm-inference-2023/"
    assert {data + f for f in SHIPPED.values()} | {data + "README.md"} <= names
    # The wheel's package first on the path, run from a folder with no repository around it.
    work = tmp_path / "work"
    work.mkdir()
    environment = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, "-m", "controller", "simulate", "azure-conv-3x", "--json"]
    command += ["--policies", str(POLICIES), "--out", str(work / "out")]
    ran = subprocess.run(
        command, cwd=work, env=environment, capture_output=True, text=True, check=False
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads(ran.stdout)
    assert result["scenario"] == "azure-conv-3x"
    assert Path(result["png"]).is_file()
    where = subprocess.run(
        [sys.executable, "-c", "import controller.sim.trace as t; print(t.__file__)"],
        cwd=work,
        env=environment,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(site)
