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


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, prefix: str = "",
                       required: tuple[str, ...] = ()) -> None:
    """One `--field-name` flag per dataclass field (dashes on the CLI, underscores in code).

    Flags default to None so that `resolve` can tell "not given" from "given the default".
    Help text comes from `metadata={"help": ...}` on the field. Fields named in `required` are listed in
    a group of their own (they may still come from a TOML file, so argparse does not enforce them).
    """
    group = parser.add_argument_group(cls.__name__)
    needed = parser.add_argument_group("required (here or in the --config file)") if required else group
    for f in dataclasses.fields(cls):
        into = needed if f.name in required else group
        tp = _scalar(_field_type(cls, f))
        flag = "--" + prefix + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else None
        help_ = f.metadata.get("help", "") + (f" (default: {default})" if default is not None else "")
        if tp is bool:
            into.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=_parse_bool,
                              default=None, metavar="BOOL", help=help_)
        elif typing.get_origin(tp) in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            into.add_argument(flag, dest=prefix.replace("-", "_") + f.name, nargs="+", default=None, help=help_,
                              type=item if item in (int, float, str) else str)
        else:
            into.add_argument(flag, dest=prefix.replace("-", "_") + f.name, type=tp, default=None, help=help_)


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
        if not isinstance(data, dict):
            raise PocketLMError(f"{p}: [{section}] must be a table of keys, got {data!r}")
    return data


_NAMES = {float: ("a number", "numbers"), int: ("an integer", "integers"), bool: ("true or false", "booleans"),
          str: ("a string", "strings")}


def type_name(tp: Any, plural: bool = False) -> str:
    """How a field's type reads in an error: `an integer`, `a number (or unset)`, `a list of strings`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        names = " or ".join(type_name(a, plural) for a in args if a is not type(None))
        return names + (" (or unset)" if type(None) in args else "")
    if origin in (list, tuple):
        return f"a list of {type_name(args[0], plural=True)}" if args else "a list"
    if origin is dict:
        return f"a table of {type_name(args[1], plural=True)}" if args else "a table"
    if tp in _NAMES:
        return _NAMES[tp][plural]
    return getattr(tp, "__name__", str(tp))


_NO = object()  # "does not match", distinct from a matched None


def _coerce(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (an int is a float, a list is a tuple), or _NO when it is not one.

    bool is an int in Python but never a number here: `micro_batch = true` is a mistake.
    """
    if tp is Any:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        for a in args:
            if a is type(None):
                if value is None:
                    return None
                continue
            v = _coerce(value, a)
            if v is not _NO:
                return v
        return _NO
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return _NO
        inner = args[0] if args else Any
        items = [_coerce(v, inner) for v in value]
        if any(v is _NO for v in items):
            return _NO
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            return _NO
        kt, vt = args if args else (Any, Any)
        out = {_coerce(k, kt): _coerce(v, vt) for k, v in value.items()}
        return _NO if _NO in out or any(v is _NO for v in out.values()) else out
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if isinstance(tp, type):
        return value if isinstance(value, tp) else _NO
    return value


def checked(cls: type, data: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """`data` with every value checked against (and converted to) its field's type in `cls`; unknown keys
    and values of the wrong type are PocketLMErrors naming the key, the type wanted and the value given."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise PocketLMError(
            f"{where}: unknown key(s) {', '.join(unknown)} for {cls.__name__}; valid keys: {', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        v = _coerce(value, hints[key])
        if v is _NO:
            raise PocketLMError(f"{where}: {key} must be {type_name(hints[key])}, got {value!r}")
        values[key] = v
    return values


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a dict of checked values (see `checked`)."""
    return cls(**checked(cls, data, where))


def resolve(cls: type[T], args: argparse.Namespace | None = None, toml: dict[str, Any] | None = None,
            where: str = "config", prefix: str = "") -> T:
    """dataclass defaults <- TOML values <- flags that were given."""
    values = checked(cls, dict(toml or {}), where)  # the file's mistakes show even where a flag overrides them
    if args is not None:
        for f in dataclasses.fields(cls):
            v = getattr(args, prefix.replace("-", "_") + f.name, None)
            if v is not None:
                values[f.name] = v
    return from_dict(cls, values, where)  # lists from flags/TOML become the declared tuple type there
