"""Pydantic errors of a policy document → a friendly sentence and a field path. Pure."""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic_core import ErrorDetails

from controller.policy.documents import API_VERSION, KINDS, json_schema
from controller.policy.sourcemap import Path

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_QUOTED = re.compile(r"'([^']*)'")
_MAPPING_TYPES = {"model_type", "model_attributes_type", "dict_type"}
_KIND_LIST = ", ".join(KINDS[:-1]) + f" or {KINDS[-1]}"


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """What went wrong, where in the document (`path`), and whether it is about a key."""

    path: Path
    message: str
    at_key: bool = False


def format_path(path: Sequence[Hashable]) -> str:
    """`('spec', 'actions', 0, 'target')` → `spec.actions[0].target`; odd keys are quoted."""
    out = ""
    for part in path:
        if isinstance(part, int) and not isinstance(part, bool):
            out += f"[{part}]"
        elif isinstance(part, str) and _IDENTIFIER.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{str(part)!r}]"
    return out


def located(path: Sequence[Hashable], message: str) -> str:
    """Prefix a message with its field path, unless it is about the whole document."""
    return f"{format_path(path)}: {message}" if path else message


def diagnose(error: ErrorDetails) -> Diagnosis:
    """Turn one error of `DocumentFile(document=...)` into a sentence about the YAML."""
    loc = list(error["loc"])[1:]  # drop the `document` wrapper field
    kind = str(loc.pop(0)) if loc and loc[0] in KINDS else None
    at_key = bool(loc) and loc[-1] == "[key]"
    if at_key:
        loc.pop()
    path: Path = tuple(loc)
    kind_of = error["type"]
    value = error.get("input")
    if kind_of == "union_tag_not_found":
        return Diagnosis(path, f"missing `kind`: write one of {_KIND_LIST}")
    if kind_of == "union_tag_invalid":
        return _bad_kind(value)
    if kind_of == "extra_forbidden":
        return _unknown_field(kind, path)
    if kind_of == "missing":
        return Diagnosis(path[:-1], located(path[:-1], f"missing required field {path[-1]!r}"))
    if not path and kind_of in _MAPPING_TYPES:
        return Diagnosis(
            path,
            "a policy document is a mapping with apiVersion, kind, metadata and spec, "
            f"not {_describe(value)}",
        )
    return Diagnosis(path, located(path, _explain(error, path, at_key)), at_key)


def _explain(error: ErrorDetails, path: Path, at_key: bool) -> str:
    kind_of = error["type"]
    value = error.get("input")
    ctx: dict[str, Any] = dict(error.get("ctx") or {})
    if kind_of in {"value_error", "assertion_error"} and "error" in ctx:
        return str(ctx["error"])
    if path == ("apiVersion",):
        return f"{value!r} is not supported: write `apiVersion: {API_VERSION}`"
    if kind_of in _MAPPING_TYPES:
        return f"expected a mapping (key: value), got {_describe(value)}"
    if kind_of in {"literal_error", "enum"} and "expected" in ctx:
        choices = _QUOTED.findall(str(ctx["expected"]))
        what = "key" if at_key else "value"
        return f"{what} {value!r} is not one of {', '.join(choices)}{did_you_mean(value, choices)}"
    message = error["msg"]
    return f"{message[:1].lower()}{message[1:]}, got {_describe(value)}"


def _bad_kind(value: object) -> Diagnosis:
    tag = value.get("kind") if isinstance(value, dict) else None
    return Diagnosis(
        ("kind",),
        f"kind: {_describe(tag)} is not a kind of policy document{did_you_mean(tag, KINDS)}; "
        f"write one of {_KIND_LIST}",
    )


def _unknown_field(kind: str | None, path: Path) -> Diagnosis:
    known = _fields_at(kind, path[:-1]) if kind else []
    message = f"unknown field {path[-1]!r}{did_you_mean(path[-1], known)}"
    if known and not did_you_mean(path[-1], known):
        message += f"; fields here: {', '.join(known)}"
    return Diagnosis(path, located(path[:-1], message), at_key=True)


def did_you_mean(value: object, choices: Sequence[str]) -> str:
    """` (did you mean 'x'?)` for the choice closest to `value` (the same one in another
    case first), else "": the hint every unknown name in a policy file gets."""
    if not isinstance(value, str) or not choices:
        return ""
    folded = {choice.lower(): choice for choice in choices}
    close = [folded[value.lower()]] if value.lower() in folded else []
    close = close or difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: object) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


@functools.cache
def _schema() -> dict[str, Any]:
    return json_schema()


def _fields_at(kind: str, path: Path) -> list[str]:
    """The field names the JSON Schema allows at `path` inside a document of `kind`."""
    node: Any = {"$ref": f"#/$defs/{kind}"}
    for part in path:
        node = _resolve(node)
        if isinstance(part, int) and "items" in node:
            node = node["items"]
        elif isinstance(part, str) and part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return []
    return list(_resolve(node).get("properties", {}))


def _resolve(node: Any) -> Any:
    """Follow `$ref`s and pick the non-null branch of an optional field."""
    defs = _schema()["$defs"]
    for _ in range(16):  # bounded: schemas from pydantic never nest refs this deep
        if "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        elif "anyOf" in node:
            node = next((b for b in node["anyOf"] if b.get("type") != "null"), {})
        else:
            break
    return node
