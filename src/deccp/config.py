"""Dataclass configs from a YAML recipe plus CLI overrides (TRL's `TrlParser`), checked strictly.

TrlParser already fails on unknown keys; values taken from YAML become argparse defaults and are never
type-checked, so `check_recipe` checks every key's type first and names the file and key on error.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from deccp import DeccpError


def _allowed(tp) -> tuple[tuple[type, ...], tuple | None]:
    """Python types a YAML value may have for a field annotation, and its Literal choices if any."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        return tuple({type(c) for c in choices}), choices
    if origin in (typing.Union, types.UnionType):
        out: tuple[type, ...] = ()
        choices = None
        for arg in typing.get_args(tp):
            t, c = _allowed(arg)
            out += t
            choices = (choices or ()) + c if c else choices
        return out, choices
    if origin in (list, tuple):
        return (list,), None
    if origin is dict:
        return (dict,), None
    if tp is float:
        return (float, int), None
    if tp is type(None):
        return (type(None),), None
    if isinstance(tp, type):
        return (tp,), None
    return (object,), None


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise DeccpError(f"{p}: recipe not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise DeccpError(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise DeccpError(f"{p}: a recipe must be a YAML mapping of keys to values")
    return data


def check_recipe(data: dict, dataclass_types: list[type], source: str, *, prefix: str = "") -> None:
    """Every key known to one of the dataclasses, every value of an allowed type; errors name `file: key`."""
    problems = recipe_problems(data, dataclass_types, source, prefix=prefix)
    if problems:
        raise DeccpError("invalid recipe:\n  " + "\n  ".join(problems.values()))


def recipe_problems(data: dict, dataclass_types: list[type], source: str, *, prefix: str = "") -> dict[str, str]:
    """{key: "file: key: what is wrong"} for every unknown key or value of a wrong type in `data`."""
    fields: dict[str, Any] = {}
    for dc in dataclass_types:
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            fields.setdefault(f.name, hints[f.name])
    problems: dict[str, str] = {}
    for key, value in data.items():
        if key == "env":
            continue
        path = f"{prefix}{key}"
        if key not in fields:
            near = difflib.get_close_matches(str(key).replace("-", "_"), list(fields), n=1, cutoff=0.75)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            problems[key] = f"{source}: {path}: unknown key{hint}"
            continue
        allowed, choices = _allowed(fields[key])
        if object in allowed:
            continue
        if isinstance(value, bool) and bool not in allowed:
            ok = False
        else:
            ok = isinstance(value, allowed)
        if not ok:
            names = "/".join(sorted({t.__name__ for t in allowed}))
            problems[key] = f"{source}: {path}: expected {names}, got {type(value).__name__} {value!r}"
        elif choices is not None and value not in choices:
            problems[key] = f"{source}: {path}: {value!r} is not one of {', '.join(map(repr, choices))}"
    return problems


def parse_config(dataclass_types: list[type], argv: list[str] | None = None):
    """Parse `--config RECIPE [--key value …]` into instances of `dataclass_types` (TRL's parser)."""
    import sys

    from trl import TrlParser

    args = list(sys.argv[1:] if argv is None else argv)
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args):
            raise DeccpError("--config needs a recipe path")
        check_recipe(load_yaml(args[i + 1]), dataclass_types, args[i + 1])
    parser = TrlParser(dataclass_types)
    try:
        return parser.parse_args_and_config(args)
    except ValueError as exc:
        raise DeccpError(str(exc)) from None
