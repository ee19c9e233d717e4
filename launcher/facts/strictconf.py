"""Strict decoding of TOML tables into frozen dataclasses, shared by every config section.

Each package owns its section's dataclasses; this module turns a parsed TOML table into them and
refuses anything it does not understand. Every error names its TOML path, the bad value and what
is allowed (`models[2].num_ctx: must be >= 256, got 0`), so the CLI can print one line and exit 2.

Field metadata understood by `decode` (all optional):
  min, max   numeric bounds (inclusive)
  choices    allowed values
  duration   the field is a float of seconds given as a number or a Go duration ("30s", "5m")
  check      callable(value) -> error text or None, for anything else
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from launcher.facts.ollama import parse_go_duration

if sys.version_info >= (3, 11):  # noqa: UP036 - tomli serves Python < 3.11
    import tomllib
else:  # pragma: no cover - exercised only on Python < 3.11
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(Exception):
    """A config value that cannot be used. `str()` is the one line to show the operator."""

    def __init__(self, path: str, message: str, *, source: str | None = None) -> None:
        self.path = path
        self.message = message
        self.source = source
        super().__init__(self._text())

    def _text(self) -> str:
        where = f"{self.source}: " if self.source else ""
        return f"{where}{self.path}: {self.message}" if self.path else f"{where}{self.message}"

    def in_file(self, source: str) -> ConfigError:
        return ConfigError(self.path, self.message, source=source)


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; a missing file or a syntax error becomes a ConfigError naming the file."""
    p = Path(path)
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("", "no such file", source=str(p)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"not valid TOML: {e}", source=str(p)) from None
    except OSError as e:
        raise ConfigError("", f"cannot read: {e.strerror}", source=str(p)) from None


def duration_seconds(value: object) -> float:
    """A config duration: a number of seconds or a Go duration string."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        seconds = parse_go_duration(value.strip())
    else:
        raise ValueError("expected a duration")
    if not math.isfinite(seconds):  # TOML's nan and inf: no timer can use them
        raise ValueError("expected a finite duration")
    return seconds


def _describe(value: object) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return str(value)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is bool:
        return "true or false"
    if origin is tuple:
        return "an array"
    if origin is dict or tp is dict:
        return "a table"
    if dataclasses.is_dataclass(tp):
        return "a table"
    if origin is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    return str(tp)


def _coerce(tp: Any, value: object, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting arrays to tuples and tables to dataclasses."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        raise ConfigError(path, f"must be {_type_name(tp)}, got {_describe(value)}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(
            path, f"must be one of {', '.join(repr(a) for a in typing.get_args(tp))}, got {_describe(value)}"
        )
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML has nan and inf; no bound check catches nan
                raise ConfigError(path, f"must be a finite number, got {_describe(value)}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is tuple:
        if isinstance(value, list):
            (item_tp, *_rest) = typing.get_args(tp)
            return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    elif origin is dict:
        if isinstance(value, dict):
            key_tp, val_tp = typing.get_args(tp)
            return {_coerce(key_tp, k, path): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    elif dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if isinstance(value, dict):
            return decode(tp, value, path)
    elif tp is Any or tp is object:
        return value
    raise ConfigError(path, f"must be {_type_name(tp)}, got {_describe(value)}")


def _check_field(f: dataclasses.Field[Any], value: Any, path: str) -> Any:
    meta = f.metadata
    if meta.get("duration") and value is not None:
        try:
            value = duration_seconds(value)
        except ValueError:
            raise ConfigError(
                path, f'must be a duration (seconds, or like "30s", "5m"), got {_describe(value)}'
            ) from None
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if lo is not None and value < lo:
            raise ConfigError(path, f"must be >= {lo}, got {_describe(value)}")
        if hi is not None and value > hi:
            raise ConfigError(path, f"must be <= {hi}, got {_describe(value)}")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(path, f"must be one of {', '.join(repr(c) for c in choices)}, got {_describe(value)}")
    check: Callable[[Any], str | None] | None = meta.get("check")
    if check is not None:
        problem = check(value)
        if problem:
            raise ConfigError(path, f"{problem}, got {_describe(value)}")
    return value


def decode(cls: type[T], table: Mapping[str, Any], path: str = "") -> T:
    """Build the frozen dataclass `cls` from a TOML table, rejecting unknown keys and bad values.

    `path` is the table's TOML path, used to prefix every error. A dataclass may define
    `validate(self, path: str) -> None` for cross-field checks; it raises ConfigError.
    """
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    for key in table:
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise ConfigError(f"{prefix}{key}", f"unknown key (allowed here: {allowed})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        if name not in table:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{prefix}{name}", "is required")
            continue
        field_path = f"{prefix}{name}"
        raw = table[name]
        tp = hints[name]
        if f.metadata.get("duration"):
            kwargs[name] = _check_field(f, raw, field_path)
            continue
        kwargs[name] = _check_field(f, _coerce(tp, raw, field_path), field_path)
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate(path)
    return obj


def decode_list(cls: type[T], value: object, path: str) -> tuple[T, ...]:
    """An array of tables (`[[models]]`) into a tuple of dataclasses."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(path, f"must be an array of tables ([[{path}]]), got {_describe(value)}")
    return tuple(decode(cls, v, f"{path}[{i}]") for i, v in enumerate(value))


def reject_unknown_sections(data: Mapping[str, Any], known: set[str]) -> None:
    """Refuse top-level keys that no package owns."""
    for key in data:
        if key not in known:
            raise ConfigError(key, f"unknown section (allowed: {', '.join(sorted(known))})")


# The top-level sections of config.toml, by owner. Both packages read the same file; each decodes
# its own sections and leaves the others alone, but nobody accepts a section that no one owns.
KNOWN_SECTIONS: frozenset[str] = frozenset({"launcher", "models", "gateway", "sim"})
