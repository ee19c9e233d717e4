"""The batch package's core types: endpoints, items, results, options, the duplicate-id error."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

PRIORITY_HEADER = "X-Corral-Priority"
BACKEND_HEADER = "X-Corral-Backend"


class Endpoint(StrEnum):
    """Which API an item's body is for, and the path it goes to."""

    CHAT = "chat"
    GENERATE = "generate"
    EMBED = "embed"
    OPENAI_CHAT = "openai-chat"

    @property
    def path(self) -> str:
        return {
            Endpoint.CHAT: "/api/chat",
            Endpoint.GENERATE: "/api/generate",
            Endpoint.EMBED: "/api/embed",
            Endpoint.OPENAI_CHAT: "/v1/chat/completions",
        }[self]


@dataclass(frozen=True)
class BatchItem:
    """One request of a batch. `key` is the id's JSON text: ids `1` and `"1"` are different items."""

    id: Any  # str | int | float, as the input gave it (or the line number)
    key: str
    endpoint: Endpoint
    body: Mapping[str, Any]  # what is sent, `model` included, `stream` false
    line: int = 0  # 1-based input line; 0 when the item did not come from a file


@dataclass(frozen=True)
class ItemResult:
    """One finished item: an answer (`ok`) or the reason there is none."""

    id: Any
    key: str
    ok: bool
    response: Any = None
    status: int | None = None  # the last HTTP status (None: no reply, e.g. connection refused)
    error: str = ""
    backend: str | None = None  # X-Corral-Backend of the answering reply (None from plain Ollama)
    attempts: int = 0
    seconds: float = 0.0  # from the first send to the final reply, retries and back-off included
    prompt_tokens: int = 0
    output_tokens: int = 0
    line: int = 0

    def to_json(self) -> dict[str, Any]:
        """The output line's object (see the README's `corral batch` section)."""
        if self.ok:
            return {
                "id": self.id,
                "ok": True,
                "response": self.response,
                "backend": self.backend,
                "attempts": self.attempts,
                "seconds": round(self.seconds, 3),
            }
        out: dict[str, Any] = {"id": self.id, "ok": False, "status": self.status, "error": self.error}
        if self.attempts:
            out |= {"attempts": self.attempts, "seconds": round(self.seconds, 3)}
        if self.backend:
            out["backend"] = self.backend
        if self.line:
            out["line"] = self.line
        return out


@dataclass(frozen=True)
class BatchOptions:
    """How a batch runs. `concurrency` None means auto: the fleet's slots for the model (from the
    gateway's capacity route), or AIMD from `start_concurrency` against a plain Ollama server."""

    url: str = "http://127.0.0.1:11434"
    model: str | None = None  # for items without one
    endpoint: Endpoint | None = None  # None: inferred per item
    concurrency: int | None = None
    retries: int = 5  # attempts after the first, for backend faults only
    priority: str = "batch"
    timeout_s: float = 600.0  # one attempt
    api_key: str = ""
    start_concurrency: int = 2
    max_concurrency: int = 64  # the most AIMD climbs to against a server without the capacity route
    backoff_base_s: float = 0.25
    backoff_cap_s: float = 10.0
    capacity_refresh_s: float = 2.0
    extra_headers: Mapping[str, str] = field(default_factory=dict)


class DuplicateIdError(ValueError):
    """Two items share an id (compared as JSON text)."""

    def __init__(self, key: str, line: int, first_line: int) -> None:
        where = f"line {line}: " if line else ""
        first = f" (first on line {first_line})" if first_line else ""
        super().__init__(f"{where}duplicate id {key}{first}")
        self.key = key
        self.line = line
        self.first_line = first_line
