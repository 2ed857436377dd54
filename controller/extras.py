"""The optional `sim` extra (PNG plots, an embedded Redis): its modules imported when used,
and the one line that says how to install it when they are missing."""

from __future__ import annotations

import importlib
from types import ModuleType

from controller.errors import ConfigurationError

SIM_INSTALL = "pip install 'governor[sim]'"


class MissingExtraError(ConfigurationError):
    """A feature whose libraries come with an extra that is not installed."""

    @classmethod
    def of(cls, exc: ImportError, needs: str) -> MissingExtraError:
        """`needs` says what wanted the module: 'the PNG plots'."""
        module = exc.name or "a module"
        return cls(f"{needs} needs {module}, from the sim extra: {SIM_INSTALL}")


def sim_module(name: str, needs: str) -> ModuleType:
    """Import `name`, a module of the sim extra; MissingExtraError when it is not installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise MissingExtraError.of(exc, needs) from None
