"""Ollama model names (types/model/name.go): `host/namespace/model:tag`, parsed and checked as Ollama
does, with the defaults a short name gets (`registry.ollama.ai/library/<model>:latest`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
_MISSING = "!MISSING!"



def _valid_part(kind: str, s: str) -> bool:
    if not 1 <= len(s) <= (350 if kind == "host" else 80):
        return False
    for i, ch in enumerate(s):
        alnum = ch.isascii() and (ch.isalnum() or ch == "_")
        if i == 0:
            if not alnum:
                return False
        elif ch in "_-":
            continue
        elif ch == ".":
            if kind == "namespace":
                return False
        elif ch == ":":
            if kind != "host":
                return False
        elif not alnum:
            return False
    return True


def _cut_promised(s: str, sep: str) -> tuple[str, str, bool]:
    i = s.rfind(sep)
    if i < 0:
        return s, "", False
    return s[:i] or _MISSING, s[i + 1 :] or _MISSING, True


@dataclass(frozen=True)
class ModelName:
    """A model name in Ollama's four parts; `parse` fills the defaults like model.ParseName."""

    host: str
    namespace: str
    model: str
    tag: str

    @classmethod
    def parse(cls, text: str) -> ModelName:
        """Parse `[host/][namespace/]model[:tag]`; check `is_valid` before using the result."""
        s = text.strip()
        host = namespace = tag = ""
        if s.rfind(":") > s.rfind("/"):
            s, tag, _ = _cut_promised(s, ":")
        s, model, promised = _cut_promised(s, "/")
        if not promised:
            model = s
        else:
            s, namespace, promised = _cut_promised(s, "/")
            if not promised:
                namespace = s
            else:
                host = s.split("://", 1)[1] if "://" in s else s
        return cls(host or DEFAULT_HOST, namespace or DEFAULT_NAMESPACE, model, tag or DEFAULT_TAG)

    @property
    def is_valid(self) -> bool:
        return (
            _valid_part("host", self.host)
            and _valid_part("namespace", self.namespace)
            and _valid_part("model", self.model)
            and _valid_part("tag", self.tag)
        )

    @property
    def display(self) -> str:
        """The shortest name Ollama shows (`DisplayShortest`): "llama3.1:8b", "user/m:tag", "h/ns/m:tag"."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def relpath(self) -> Path:
        return Path(self.host, self.namespace, self.model, self.tag)

    def key(self) -> tuple[str, str, str, str]:
        """Case-insensitive identity (Ollama resolves names against the store ignoring case)."""
        return (self.host.lower(), self.namespace.lower(), self.model.lower(), self.tag.lower())
