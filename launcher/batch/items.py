"""Input lines -> batch items: one JSON object per line, `id` plus the chosen endpoint's body.

A line that is not JSON, or not a valid request, becomes an `InputError` with its line number (the
CLI writes it to the output as a failed item; the other lines run). Ids are compared as their JSON
text, so `1` and `"1"` are two items; a line without an id gets its line number.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from launcher.batch.types import BatchItem, DuplicateIdError, Endpoint

# Fields that say which endpoint a body is for, most specific first. OpenAI chat bodies also carry
# `messages`, so openai-chat is inferred only from fields Ollama's chat does not have.
_OPENAI_ONLY_FIELDS = (
    "max_tokens", "max_completion_tokens", "n", "response_format", "frequency_penalty", "presence_penalty",
    "logprobs", "top_logprobs", "stream_options", "temperature", "top_p",
)  # fmt: skip


@dataclass(frozen=True)
class InputError:
    """A line that cannot be sent. `id` is the line's own id when it had a usable one, else the line number."""

    line: int
    id: Any
    key: str
    message: str
    own_id: bool = True  # False when the line had no usable id (the line number stands in)


def id_key(value: Any) -> str:
    """The id's JSON text, the one thing ids are compared by."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def infer_endpoint(body: Mapping[str, Any]) -> Endpoint | None:
    if "messages" in body:
        return Endpoint.OPENAI_CHAT if any(k in body for k in _OPENAI_ONLY_FIELDS) else Endpoint.CHAT
    if "prompt" in body:
        return Endpoint.GENERATE
    if "input" in body:
        return Endpoint.EMBED
    return None


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int | float) and not isinstance(value, bool))


def _body_problem(endpoint: Endpoint, body: Mapping[str, Any]) -> str | None:
    """Why this body is not a request for `endpoint`, or None when it is."""
    if endpoint in (Endpoint.CHAT, Endpoint.OPENAI_CHAT):
        messages = body.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            return f"{endpoint.value} needs `messages`, a list of objects"
    elif endpoint == Endpoint.GENERATE:
        if not isinstance(body.get("prompt"), str):
            return "generate needs `prompt`, a string"
    elif endpoint == Endpoint.EMBED:
        given = body.get("input")
        if not (isinstance(given, str) or (isinstance(given, list) and all(isinstance(s, str) for s in given))):
            return "embed needs `input`, a string or a list of strings"
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        return "`options` must be an object"
    return None


def parse_item(
    value: Any, line: int, *, model: str | None = None, endpoint: Endpoint | None = None
) -> BatchItem | InputError:
    """One decoded input object -> an item to send, or why it cannot be sent."""
    fallback_id, fallback_key = line, id_key(line)
    if not isinstance(value, dict):
        return InputError(
            line, fallback_id, fallback_key, f"line {line}: expected a JSON object, got {type(value).__name__}", False
        )
    item_id = value.get("id", line)
    if not _valid_id(item_id):
        return InputError(line, fallback_id, fallback_key, f"line {line}: `id` must be a string or a number", False)
    key = id_key(item_id)
    body = {k: v for k, v in value.items() if k != "id"}
    chosen = endpoint or infer_endpoint(body)
    if chosen is None:
        return InputError(line, item_id, key, f"line {line}: no `messages`, `prompt` or `input`: which endpoint?")
    problem = _body_problem(chosen, body)
    if problem is None and not isinstance(body.get("model") or model, str):
        problem = "no `model` (give one per line or --model)"
    if problem is not None:
        return InputError(line, item_id, key, f"line {line}: {problem}")
    body.setdefault("model", model)
    body["stream"] = False
    return BatchItem(id=item_id, key=key, endpoint=chosen, body=body, line=line)


def parse_line(
    text: str, line: int, *, model: str | None = None, endpoint: Endpoint | None = None
) -> BatchItem | InputError | None:
    """One input line -> item, error, or None for a blank line (skipped, as JSONL readers do)."""
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        return InputError(line, line, id_key(line), f"line {line}: not JSON: {e.msg} (column {e.colno})", False)
    return parse_item(value, line, model=model, endpoint=endpoint)


def read_lines(
    lines: Iterable[str], *, model: str | None = None, endpoint: Endpoint | None = None
) -> Iterator[BatchItem | InputError]:
    """Parse every line (1-based numbering, blank lines skipped)."""
    for number, text in enumerate(lines, start=1):
        parsed = parse_line(text, number, model=model, endpoint=endpoint)
        if parsed is not None:
            yield parsed


def check_unique(parsed: Iterable[BatchItem | InputError]) -> None:
    """Raise DuplicateIdError at the first id seen twice. Lines without an id of their own (not
    JSON, not an object, a bad id) are not compared."""
    first_line: dict[str, int] = {}
    for entry in parsed:
        if isinstance(entry, InputError) and not entry.own_id:
            continue
        if entry.key in first_line:
            raise DuplicateIdError(entry.key, entry.line, first_line[entry.key])
        first_line[entry.key] = entry.line
