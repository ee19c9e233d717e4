"""Reading what the router needs out of a model-scoped request, and refusing bad ones like Ollama.

The body is forwarded unchanged; this only looks at it: the model, the load-time options, whether
it streams, a rough prompt size, and whether it is an unload (empty prompt with keep_alive 0).
OpenAI-compatible requests carry no Ollama options (Ollama's middleware maps only sampling ones).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.api.strictjson import loads_strict
from gateway.routing.policy import RequestKind
from gateway.routing.snapshot import LoadOptions
from launcher.facts.catalog import normalize_name
from launcher.facts.ollama import is_zero_keep_alive

# A rough bytes-per-token ratio for prompt-size estimates (English text under BPE vocabularies).
BYTES_PER_TOKEN = 4

# Path -> (kind, OpenAI-compatible).
ROUTED_PATHS: dict[str, tuple[RequestKind, bool]] = {
    "/api/generate": ("generate", False),
    "/api/chat": ("chat", False),
    "/api/embed": ("embed", False),
    "/api/embeddings": ("embed", False),
    "/api/show": ("show", False),
    "/v1/chat/completions": ("chat", True),
    "/v1/completions": ("generate", True),
    "/v1/embeddings": ("embed", True),
    "/v1/responses": ("chat", True),
    "/v1/messages": ("chat", True),
}


# Ollama's GenerateHandler and EmbedHandler answer a request without a model with their not-found
# reply, 404 "model '' not found" (routes.go: writeModelRefParseError's fallback); the other
# handlers and middlewares say 400 "model is required".
MISSING_MODEL_NOT_FOUND_PATHS: frozenset[str] = frozenset(
    {"/api/generate", "/api/embed", "/v1/completions", "/v1/embeddings"}
)


class BadRequest(Exception):
    """A request refused before routing: `status` and an Ollama-style `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ModelCall:
    """One model-scoped request as the gateway routes it."""

    model: str  # normalized name
    requested_as: str  # as the client wrote it
    kind: RequestKind
    openai: bool
    options: LoadOptions
    stream: bool
    prompt_tokens: int
    unload: bool  # empty prompt or messages with keep_alive 0: unload wherever it is loaded
    num_predict: int | None = None  # the answer's cap when the request sets one (options or max_tokens)


def parse_body(body: bytes) -> dict[str, Any]:
    """The JSON object of a request body; BadRequest with Ollama's texts otherwise."""
    if not body.strip():
        raise BadRequest(400, "missing request body")
    try:
        value = loads_strict(body)
    except ValueError as e:
        raise BadRequest(400, f"invalid JSON in request body: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(400, "invalid request body: expected a JSON object")
    return value


_TEXT_KEYS = ("content", "text", "input", "prompt", "system")


def _text_size(value: object) -> int:
    """UTF-8 bytes of the text in a prompt, messages list or content parts (images not counted)."""
    if isinstance(value, str):
        return len(value) if value.isascii() else len(value.encode())
    total = 0
    if isinstance(value, list):
        for item in value:
            total += _text_size(item)
    elif isinstance(value, Mapping):
        for key in _TEXT_KEYS:
            item = value.get(key)
            if item is not None:
                total += _text_size(item)
    return total


def _is_unload(kind: RequestKind, data: Mapping[str, Any]) -> bool:
    if "keep_alive" not in data or not is_zero_keep_alive(data["keep_alive"]):
        return False
    if kind == "generate":
        return not data.get("prompt")
    if kind == "chat":
        return not data.get("messages")
    return False


_PROMPT_KEYS = ("prompt", "messages", "input", "system", "suffix")


def parse_model_call(path: str, body: bytes, path_model: str | None = None) -> ModelCall:
    """Read a model-scoped request. `path_model` is the model named in the URL (/v1/models/{model}).
    Raises BadRequest (400, or 404 for a missing model where Ollama says so) for a body Ollama
    would refuse before looking the model up."""
    if path_model is not None:
        name = path_model
        return ModelCall(normalize_name(name), name, "show", True, LoadOptions(), False, 0, False)
    kind, openai = ROUTED_PATHS[path]
    data = parse_body(body)
    raw_model = data.get("model")
    if kind == "show" and not raw_model:
        raw_model = data.get("name")  # /api/show still accepts the deprecated "name"
    if raw_model is not None and not isinstance(raw_model, str):
        raise BadRequest(400, "invalid model name: must be a string")
    if raw_model is None or not raw_model.strip():  # Ollama trims the name before checking it
        if path in MISSING_MODEL_NOT_FOUND_PATHS:
            raise BadRequest(404, f"model '{raw_model or ''}' not found")
        raise BadRequest(400, "model is required")
    options = data.get("options") if not openai else None
    if options is not None and not isinstance(options, Mapping):
        raise BadRequest(400, "invalid options: must be a JSON object")
    stream_value = data.get("stream")
    default_stream = kind in ("generate", "chat") and not openai
    stream = default_stream if stream_value is None else bool(stream_value)
    prompt_bytes = 0
    for key in _PROMPT_KEYS:
        part = data.get(key)
        if part is not None:
            prompt_bytes += _text_size(part)
    return ModelCall(
        model=normalize_name(raw_model),
        requested_as=raw_model,
        kind=kind,
        openai=openai,
        options=LoadOptions.from_request_options(options),
        stream=stream,
        prompt_tokens=prompt_bytes // BYTES_PER_TOKEN,
        unload=not openai and _is_unload(kind, data),
        num_predict=_num_predict(data, options, openai),
    )


# Where each API caps the answer's length: Ollama's options.num_predict, OpenAI's max_tokens (and
# its newer names), Anthropic's max_tokens.
_OPENAI_CAPS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def _num_predict(data: Mapping[str, Any], options: Mapping[str, Any] | None, openai: bool) -> int | None:
    """The request's own answer cap, for the wait model; None when unset or not a positive count
    (Ollama's -1 and -2 mean "no cap")."""
    values: list[object] = [options.get("num_predict")] if options else []
    if openai:
        values = [data.get(key) for key in _OPENAI_CAPS]
    for value in values:
        if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None
