"""JSON as Go's encoding/json (and so Ollama) reads it, for request bodies.

Python's json accepts `NaN`, `Infinity` and `-Infinity`, which Go refuses: passed on, they surface
as a backend 500 on every backend tried. Deep nesting (100,000 `[`) would exhaust the parser's
stack (RecursionError, a 500); it is refused as the client's error instead.
"""

from __future__ import annotations

import json
from typing import Any

# Deeper JSON than this is refused. Ollama's requests nest a few levels (messages -> content parts
# -> image_url, tool schemas a few more); 128 leaves room for any real tool schema.
MAX_JSON_DEPTH = 128


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a valid JSON value")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests lists/objects deeper than `limit` (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def loads_strict(body: bytes | str) -> Any:
    """The JSON value of `body`. Raises ValueError (with the reason) for invalid JSON, NaN/Infinity
    and nesting deeper than MAX_JSON_DEPTH."""
    try:
        # As json.loads reads bytes (UTF-8, -16 or -32 by their first bytes), with one decoder
        # for every call instead of a new one each.
        text = body.decode(json.detect_encoding(body), "surrogatepass") if isinstance(body, bytes) else body
        value = _DECODER.decode(text)
    except RecursionError:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels") from None
    # Nesting needs an opening bracket per level: a body with few of them (every usual request)
    # cannot be too deep, and counting bytes is far cheaper than walking the value.
    brackets = body.count(b"[") + body.count(b"{") if isinstance(body, bytes) else body.count("[") + body.count("{")
    if brackets > MAX_JSON_DEPTH and json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")
    return value
