"""Config dataclasses <-> TOML files <-> command-line flags.

Defaults live only in the dataclasses. A TOML file overrides them, flags override the file, and an
unknown key anywhere is an error (with the file and key named), never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pocketlm import PocketLMError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


def _scalar(tp: Any) -> Any:
    """`bool | None` -> bool, etc.: the type a flag's string is parsed into."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(tp) if a is not type(None))
    return tp


def _parse_bool(s: str) -> bool:
    low = s.lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {s!r}")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "") -> None:
    """One `--field-name` flag per dataclass field (dashes on the CLI, underscores in code).

    Flags default to None so that `resolve` can tell "not given" from "given the default".
    Help text comes from `metadata={"help": ...}` on the field.
    """
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        tp = _scalar(_field_type(cls, f))
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        if tp is bool:
            group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=_parse_bool,
                               default=None, metavar="BOOL", help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, nargs="+", default=None, help=help_)
        else:
            group.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=tp, default=None, help=help_)


def load_toml(path: str | Path, section: str | None = None) -> dict[str, Any]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise PocketLMError(f"config file {p} not found: pass an existing .toml with --config")
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise PocketLMError(f"{p}: invalid TOML ({e}); fix the file or drop --config") from None
    if section is not None:
        data = data.get(section, {})
    return data


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a dict, refusing unknown keys (naming them and the place they came from)."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PocketLMError(
            f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; valid keys: {', '.join(sorted(names))}")
    return cls(**data)


def resolve(cls: type[T], args: argparse.Namespace | None = None, toml: dict[str, Any] | None = None,
            where: str = "config", prefix: str = "") -> T:
    """dataclass defaults <- TOML values <- flags that were given."""
    values: dict[str, Any] = dict(toml or {})
    if args is not None:
        for f in dataclasses.fields(cls):
            v = getattr(args, prefix.replace("-", "_") + f.name, None)
            if v is not None:
                values[f.name] = v
    cfg = from_dict(cls, values, where)
    for f in dataclasses.fields(cls):  # lists from flags/TOML become the declared tuple type
        if typing.get_origin(_scalar(_field_type(cls, f))) is tuple and isinstance(getattr(cfg, f.name), list):
            setattr(cfg, f.name, tuple(getattr(cfg, f.name)))
    return cfg
