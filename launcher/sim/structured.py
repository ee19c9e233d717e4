"""Structured outputs: a deterministic JSON instance that validates against the request's schema.

Ollama hands a `format` schema to llama-server (`json_schema`), whose grammar constrains every token,
so the answer always validates. The simulator builds a valid instance directly: types (and type
lists), `required` and optional properties, `enum`, `const`, arrays (`items`, `prefixItems`,
`minItems`/`maxItems`), nested objects, `$ref` into `$defs`/`definitions` as pydantic emits them,
`anyOf`/`oneOf`/`allOf`, numeric bounds, string lengths and the simple string formats. A schema
llama.cpp's converter rejects (an unresolvable `$ref`, an unknown `type`) fails the way llama-server
fails it: a 400 whose text starts "JSON schema conversion failed".
"""

from __future__ import annotations

import json
import math
import random
from typing import Any

WORDS = ("alpha", "river", "stone", "cloud", "field", "light", "paper", "signal", "garden", "window", "harbor",
         "market", "forest", "engine", "answer", "sample", "order", "value", "node", "graph")  # fmt: skip
_MAX_DEPTH = 24


class SchemaError(Exception):
    """A schema the grammar converter cannot turn into a grammar; `str()` is llama-server's text."""

    def __init__(self, problem: str) -> None:
        super().__init__(f"JSON schema conversion failed:\n{problem}")


def _resolve(root: dict[str, Any], ref: str) -> Any:
    if not ref.startswith("#"):
        raise SchemaError(f"Unsupported ref: {ref}")
    target: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(target, dict) or part not in target:
            raise SchemaError(f"Error resolving ref {ref}: {part} not in {json.dumps(target)[:200]}")
        target = target[part]
    return target


def _string(rng: random.Random, schema: dict[str, Any]) -> str:
    fmt = schema.get("format")
    day = f"20{rng.randint(10, 29)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    if fmt == "date":
        return day
    if fmt == "date-time":
        return f"{day}T{rng.randint(0, 23):02d}:00:00Z"
    if fmt == "time":
        return f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:00Z"
    if fmt == "email":
        return f"{rng.choice(WORDS)}@example.com"
    if fmt == "uuid":
        return "-".join("".join(rng.choice("0123456789abcdef") for _ in range(n)) for n in (8, 4, 4, 4, 12))
    if fmt in ("uri", "url"):
        return f"https://example.com/{rng.choice(WORDS)}"
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3)))
    low: int = schema["minLength"] if isinstance(schema.get("minLength"), int) else 0
    high: int | None = schema["maxLength"] if isinstance(schema.get("maxLength"), int) else None
    while len(text) < low:
        text += " " + rng.choice(WORDS)
    if high is not None:
        text = text[: max(high, low)]
    return text


def _number(rng: random.Random, schema: dict[str, Any], integer: bool) -> int | float:
    low = schema.get("minimum")
    high = schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    lo = float(low) if isinstance(low, int | float) else 0.0
    hi = float(high) if isinstance(high, int | float) else lo + 100.0
    if isinstance(ex_low, int | float):
        lo = max(lo, ex_low + (1 if integer else 0.01))
    if isinstance(ex_high, int | float):
        hi = min(hi, ex_high - (1 if integer else 0.01))
    if hi < lo:
        hi = lo
    if integer:
        return rng.randint(math.ceil(lo), max(math.ceil(lo), math.floor(hi)))
    return round(lo + rng.random() * (hi - lo), 2)


def _merge_all_of(root: dict[str, Any], schema: dict[str, Any], depth: int) -> dict[str, Any]:
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for part in schema.get("allOf") or []:
        part = _deref(root, part, depth)
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**merged.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = [*merged.get("required", []), *value]
            else:
                merged.setdefault(key, value)
    return merged


def _deref(root: dict[str, Any], schema: Any, depth: int) -> dict[str, Any]:
    seen = 0
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
        seen += 1
        if seen > _MAX_DEPTH:
            raise SchemaError(f"Error resolving ref {schema['$ref']}: too deep")
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        schema = {**_as_dict(_resolve(root, schema["$ref"])), **extra}
    return _as_dict(schema)


def _as_dict(schema: Any) -> dict[str, Any]:
    # A keyword whose value is not a schema (true, a string) constrains nothing, as before.
    return schema if isinstance(schema, dict) else {}


_TYPES = ("object", "array", "string", "integer", "number", "boolean", "null")


def instance(rng: random.Random, root: dict[str, Any], schema: Any = None, depth: int = 0) -> Any:
    """A value valid for `schema` (default: the root). Raises SchemaError."""
    if depth > _MAX_DEPTH:
        raise SchemaError("Unrecognized schema: recursion too deep")
    node = _deref(root, root if schema is None else schema, depth)
    if "allOf" in node:
        node = _merge_all_of(root, node, depth)
    if "const" in node:
        return node["const"]
    enum = node.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and options:
            # Prefer a non-null branch, so Optional[...] fields carry a value.
            picked = [o for o in options if not (isinstance(o, dict) and o.get("type") == "null")] or options
            rest = {k: v for k, v in node.items() if k != key}
            return instance(rng, root, {**rest, **_as_dict(picked[0])}, depth + 1)
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"] or kind
        kind = kinds[0] if kinds else None
    if kind is not None and kind not in _TYPES:
        raise SchemaError(f"Unrecognized schema: {json.dumps(node)}")
    if kind == "object" or (kind is None and ("properties" in node or "additionalProperties" in node)):
        return _object(rng, root, node, depth)
    if kind == "array" or (kind is None and ("items" in node or "prefixItems" in node)):
        return _array(rng, root, node, depth)
    if kind == "integer":
        return _number(rng, node, True)
    if kind == "number":
        return _number(rng, node, False)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if kind == "string" or depth:
        return _string(rng, node)
    return {"answer": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 8))), "score": rng.randint(0, 10)}


def _object(rng: random.Random, root: dict[str, Any], node: dict[str, Any], depth: int) -> dict[str, Any]:
    props: dict[str, Any] = node["properties"] if isinstance(node.get("properties"), dict) else {}
    required = [r for r in node.get("required") or [] if isinstance(r, str)]
    out: dict[str, Any] = {}
    for key, sub in props.items():
        # Optional properties are filled near the top (a realistic answer) and left out deeper,
        # so a recursive model (a tree of children) ends.
        if key in required or depth < 3:
            out[str(key)] = instance(rng, root, sub, depth + 1)
    for key in required:
        if key not in out:
            extra = node.get("additionalProperties")
            out[key] = instance(rng, root, extra if isinstance(extra, dict) else {"type": "string"}, depth + 1)
    if not props and isinstance(node.get("additionalProperties"), dict) and depth < 3:
        out[rng.choice(WORDS)] = instance(rng, root, node["additionalProperties"], depth + 1)
    return out


def _array(rng: random.Random, root: dict[str, Any], node: dict[str, Any], depth: int) -> list[Any]:
    prefix: list[Any] = node["prefixItems"] if isinstance(node.get("prefixItems"), list) else []
    low: int = node["minItems"] if isinstance(node.get("minItems"), int) else 0
    high: int | None = node["maxItems"] if isinstance(node.get("maxItems"), int) else None
    count = max(low, len(prefix), rng.randint(1, 3) if depth < 4 else 0)
    if high is not None:
        count = min(count, max(high, low))
    items = node.get("items", {} if prefix else {"type": "string"})
    out = [instance(rng, root, prefix[i] if i < len(prefix) else items, depth + 1) for i in range(count)]
    if node.get("uniqueItems") and len({json.dumps(v, sort_keys=True) for v in out}) < len(out):
        out = out[:1]
    return out


def answer(rng: random.Random, fmt: Any) -> str:
    """The JSON text of a structured answer: `fmt` is "json" or a schema dict. Raises SchemaError."""
    value = instance(rng, fmt if isinstance(fmt, dict) else {})
    return json.dumps(value, separators=(", ", ": "), ensure_ascii=False)
