"""JSON in and out the way Ollama's Go server does it.

In: gin's `ShouldBindJSON` decodes the body with `json.NewDecoder(body).Decode(&req)`: an empty body
is `io.EOF` ("missing request body"), only the first JSON value is read (trailing bytes are ignored),
field names match case-insensitively, and a value of the wrong type is reported as
`json: cannot unmarshal number into Go struct field GenerateRequest.prompt of type string`.
`bind` reproduces those outcomes and messages for the request types the simulator serves.

Out: `encode` marshals like `encoding/json` (compact, UTF-8, with `<`, `>`, `&`, U+2028 and U+2029
escaped), and `format_time` writes `time.Time` as RFC 3339 with nanoseconds and trailing zeros cut.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from launcher.facts.ollama import parse_go_duration

# Go field kinds: "string", "bool", "int", "float", "map" (object), "list" (any array), "[]int",
# "[]string", "any" (anything), "duration" (api.Duration), "think", "messages", "tools",
# "optbool" (a *bool).
Schema = dict[str, str]

GENERATE_REQUEST: Schema = {
    "model": "string", "prompt": "string", "suffix": "string", "system": "string", "template": "string",
    "context": "[]int", "stream": "optbool", "raw": "bool", "format": "any", "keep_alive": "duration",
    "images": "[]string", "options": "map", "think": "think", "truncate": "optbool", "shift": "optbool",
    "_debug_render_only": "bool", "logprobs": "bool", "top_logprobs": "int",
}  # fmt: skip
CHAT_REQUEST: Schema = {
    "model": "string", "messages": "messages", "stream": "optbool", "format": "any", "keep_alive": "duration",
    "tools": "tools", "options": "map", "think": "think", "truncate": "optbool", "shift": "optbool",
    "_debug_render_only": "bool", "logprobs": "bool", "top_logprobs": "int",
}  # fmt: skip
EMBED_REQUEST: Schema = {
    "model": "string", "input": "any", "keep_alive": "duration", "truncate": "optbool", "dimensions": "int",
    "options": "map",
}  # fmt: skip
EMBEDDING_REQUEST: Schema = {"model": "string", "prompt": "string", "keep_alive": "duration", "options": "map"}
PULL_REQUEST: Schema = {
    "model": "string", "insecure": "bool", "username": "string", "password": "string", "stream": "optbool",
    "name": "string",
}  # fmt: skip
PUSH_REQUEST: Schema = PULL_REQUEST
SHOW_REQUEST: Schema = {
    "model": "string", "system": "string", "template": "string", "verbose": "bool", "options": "map", "name": "string",
}  # fmt: skip
DELETE_REQUEST: Schema = {"model": "string", "name": "string"}
COPY_REQUEST: Schema = {"source": "string", "destination": "string"}
CREATE_REQUEST: Schema = {
    "model": "string", "stream": "optbool", "quantize": "string", "draft_quantize": "string", "from": "string",
    "remote_host": "string", "files": "map", "draft_files": "map", "adapters": "map", "template": "string",
    "license": "any", "system": "string", "parameters": "map", "messages": "messages", "renderer": "string",
    "parser": "string", "requires": "string", "info": "map", "name": "string", "quantization": "string",
}  # fmt: skip
MESSAGE: Schema = {
    "role": "string", "content": "string", "thinking": "string", "images": "[]string", "tool_calls": "list",
    "tool_name": "string", "tool_call_id": "string",
}  # fmt: skip


class BindError(Exception):
    """A request body gin would refuse; `str()` is Go's error text (always a 400)."""


def json_kind(value: Any) -> str:
    """How Go's UnmarshalTypeError names a JSON value."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


_GO_TYPE_NAMES = {
    "string": "string", "bool": "bool", "optbool": "bool", "int": "int", "float": "float64",
    "map": "map[string]interface {}", "[]int": "[]int", "[]string": "[]api.ImageData", "list": "[]api.ToolCall",
    "messages": "[]api.Message", "tools": "api.Tools",
}  # fmt: skip


def _type_error(value: Any, where: str, kind: str) -> str:
    return f"json: cannot unmarshal {json_kind(value)} into Go struct field {where} of type {_GO_TYPE_NAMES[kind]}"


def _check(value: Any, kind: str, where: str) -> str | None:
    """Go's error for `value` decoded into a field of `kind`, or None when it decodes."""
    if value is None or kind == "any":
        return None  # JSON null leaves a Go field at its zero value
    ok = {
        "string": isinstance(value, str),
        "bool": isinstance(value, bool),
        "optbool": isinstance(value, bool),
        "int": isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer(),
        "float": isinstance(value, int | float) and not isinstance(value, bool),
        "map": isinstance(value, dict),
        "list": isinstance(value, list),
        "[]int": isinstance(value, list),
        "[]string": isinstance(value, list),
        "messages": isinstance(value, list),
        "tools": isinstance(value, list),
    }.get(kind, True)
    if kind == "int" and isinstance(value, int | float) and not isinstance(value, bool) and not ok:
        return f"json: cannot unmarshal number {value} into Go struct field {where} of type int"
    if not ok:
        return _type_error(value, where, kind)
    if kind == "[]int":
        for item in value:
            if item is not None and (isinstance(item, bool) or not isinstance(item, int)):
                return _type_error(item, where, "int")
    if kind == "[]string":
        for item in value:
            if item is not None and not isinstance(item, str):
                return _type_error(item, where, "string")
    if kind == "messages":
        for item in value:
            if item is None:
                continue
            if not isinstance(item, dict):
                return _type_error(item, where, "messages")
            for key, sub in item.items():
                field = _field(MESSAGE, key)
                if field is not None and (err := _check(sub, MESSAGE[field], f"{where}.{field}")):
                    return err
    if kind == "duration":
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            return f"Unsupported type: '{go_type_of(value)}'"
        if isinstance(value, str):
            try:
                parse_go_duration(value)
            except ValueError as e:
                return str(e)
    if kind == "think" and not (isinstance(value, bool) or value in ("high", "medium", "low", "max")):
        if isinstance(value, str):
            return f'invalid think value: "{value}" (must be "high", "medium", "low", "max", true, or false)'
        return 'think must be a boolean or string ("high", "medium", "low", "max", true, or false)'
    return None


def go_type_of(value: Any) -> str:
    """fmt's %T (or reflect.TypeOf) of a JSON value decoded into `any`."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "[]interface {}"
    if isinstance(value, dict):
        return "map[string]interface {}"
    return "float64"


def _field(schema: Schema, key: str) -> str | None:
    """encoding/json matches an exact field name first, then case-insensitively."""
    if key in schema:
        return key
    lowered = key.lower()
    for name in schema:
        if name.lower() == lowered:
            return name
    return None


def _syntax_error(text: str, err: json.JSONDecodeError) -> str:
    """A Go-like message for a syntax error Python found."""
    pos = err.pos
    if pos >= len(text.rstrip()):
        return "unexpected EOF"
    ch = text[pos]
    shown = ch if ch != "'" else "\\'"
    if err.msg.startswith("Expecting property name"):
        return f"invalid character '{shown}' looking for beginning of object key string"
    if err.msg.startswith("Expecting ':'"):
        return f"invalid character '{shown}' after object key"
    if err.msg.startswith("Expecting ','"):
        return f"invalid character '{shown}' after object key:value pair"
    if err.msg.startswith("Unterminated string"):
        return "unexpected EOF"
    if err.msg.startswith("Invalid control character"):
        return f"invalid character {json.dumps(ch)[1:-1]!r} in string literal"
    return f"invalid character '{shown}' looking for beginning of value"


def bind(body: bytes, schema: Schema, type_name: str) -> dict[str, Any]:
    """Decode a request body into a dict keyed by the schema's field names. Raises BindError.

    An empty body raises BindError("missing request body") like the handlers' io.EOF branch.
    """
    text = body.decode("utf-8", errors="replace")
    if not text.strip():
        raise BindError("missing request body")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip())
    try:
        value, _end = decoder.raw_decode(text, start)  # the first value only, like json.Decoder
    except json.JSONDecodeError as e:
        raise BindError(_syntax_error(text, e)) from None
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BindError(f"json: cannot unmarshal {json_kind(value)} into Go value of type api.{type_name}")
    out: dict[str, Any] = {}
    first_error: str | None = None
    for key, sub in value.items():
        field = _field(schema, key)
        if field is None:
            continue
        err = _check(sub, schema[field], f"{type_name}.{field}")
        if err is not None:
            # Custom unmarshalers (durations, think) abort at once; type mismatches are reported
            # after the whole value was read, the first one winning.
            if schema[field] in ("duration", "think"):
                raise BindError(err)
            first_error = first_error or err
            continue
        out[field] = sub
    if first_error:
        raise BindError(first_error)
    return out


# ---------------------------------------------------------------------------------------------
# Output


def encode(value: Any) -> bytes:
    """Marshal like Go's encoding/json: compact, raw UTF-8, HTML characters escaped."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text.encode("utf-8")


def format_time(epoch_s: float) -> str:
    """time.Time in UTC as RFC3339Nano: "2026-01-02T15:04:05.123456789Z" (trailing zeros cut)."""
    whole = int(epoch_s // 1)
    nanos = round((epoch_s - whole) * 1e9)
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    try:
        stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, ValueError, OSError):
        stamp = "9999-12-31T23:59:59"
    frac = f"{nanos:09d}".rstrip("0")
    return f"{stamp}.{frac}Z" if frac else f"{stamp}Z"


def format_datetime(dt: datetime) -> str:
    return format_time(dt.timestamp())
