"""The Lua enforcement scripts as package data: each is lib.lua's shared prelude + its body."""

from __future__ import annotations

import functools
from importlib import resources

NAMES = ("admit", "settle", "charge", "topup")


def _file(name: str) -> str:
    return resources.files("controller.contract").joinpath(f"lua/{name}.lua").read_text()


@functools.cache
def script_source(name: str) -> str:
    """The source Redis runs for script `name`: one shared prelude (time, field names, lease
    sweep) keeps the scripts consistent."""
    if name not in NAMES:
        raise ValueError(f"no Lua script {name!r}; the contract has {', '.join(NAMES)}")
    return _file("lib") + "\n" + _file(name)
