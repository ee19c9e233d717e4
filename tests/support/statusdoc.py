"""Check a status document against its TypedDicts (gateway/api/status_doc.py), recursively.

The TypedDicts are the contract between the gateway and its readers (`corral status`, `corral top`,
the page); this turns them into a runtime check so a test of the live gateway sees any drift: a key
missing or extra, or a value of the wrong type.
"""

from __future__ import annotations

import types
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints, is_typeddict


def mismatches(value: Any, expected: Any, where: str = "$") -> list[str]:
    """Every place where `value` does not have the type `expected`; [] when it conforms."""
    origin = get_origin(expected)
    if is_typeddict(expected):
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        hints = get_type_hints(expected)
        problems = [f"{where}: missing {k!r}" for k in hints if k not in value]
        problems += [f"{where}: unexpected {k!r}" for k in value if k not in hints]
        for key, hint in hints.items():
            if key in value:
                problems += mismatches(value[key], hint, f"{where}.{key}")
        return problems
    if origin in (Union, types.UnionType):
        options = [mismatches(value, option, where) for option in get_args(expected)]
        return [] if any(not o for o in options) else [f"{where}: {value!r} is not {expected}"]
    if origin is Literal:
        return [] if value in get_args(expected) else [f"{where}: {value!r} is not one of {get_args(expected)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {value!r}"]
        (item,) = get_args(expected)
        return [p for i, v in enumerate(value) for p in mismatches(v, item, f"{where}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{where}: expected an object, got {value!r}"]
        key_type, item = get_args(expected)
        problems = [f"{where}: key {k!r} is not {key_type}" for k in value if not isinstance(k, key_type)]
        return problems + [p for k, v in value.items() for p in mismatches(v, item, f"{where}[{k!r}]")]
    if expected is type(None):
        return [] if value is None else [f"{where}: expected null, got {value!r}"]
    if expected is float:  # JSON has one number type: 3 is a fine float
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected a number, got {value!r}"]
    if expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return [] if ok else [f"{where}: expected an integer, got {value!r}"]
    if isinstance(expected, type):
        return [] if isinstance(value, expected) else [f"{where}: expected {expected.__name__}, got {value!r}"]
    raise TypeError(f"{where}: cannot check against {expected!r}")
