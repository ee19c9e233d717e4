"""What a model is, from the best source available: the local store, a running backend, the catalog.

1. "store": the Ollama store (OLLAMA_MODELS). The manifest's model layer gives the file size (its
   declared `size`, which is also right for the simulated store's metadata-only blobs) and the blob's
   GGUF header gives the architecture (launcher.models.gguf).
2. "api-show": a running backend's `/api/show` (model_info holds the GGUF key/values, tensors their
   shapes) plus `/api/tags` for the size. Ollama leaves arrays out of a non-verbose show (they come
   back null), so the vocabulary is read from the token-embedding tensor's shape, and per-layer head
   counts trigger one verbose request.
3. "catalog": launcher.facts.catalog's built-in table.

A source that cannot answer is skipped, and why is kept; a model no source knows raises `ModelUnknown`
naming the model and everything tried.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from launcher.facts.catalog import ModelSpec, find_model, normalize_name
from launcher.models.gguf import GGUFError, read_gguf, spec_from_gguf
from launcher.models.show import ShowIncomplete, needs_verbose, spec_from_show
from launcher.models.store import InvalidDigest, ModelStore

ModelSource = Literal["store", "api-show", "catalog"]
DEFAULT_SHOW_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ResolvedModel:
    """A model's facts and where they came from."""

    spec: ModelSpec
    source: ModelSource
    detail: str  # the blob, URL or table that answered
    skipped: tuple[str, ...] = ()  # why earlier sources did not answer


class ModelUnknown(LookupError):
    """No source knows the model; the message names it and says what was tried."""


class _SourceFailed(Exception):
    """One source could not answer; the message says why (in the final error's words)."""


# ------------------------------------------------------------------------------------------------- store


def _from_store(name: str, models_dir: Path) -> tuple[ModelSpec, str]:
    store = ModelStore(models_dir)
    if not store.manifests_dir.is_dir():
        raise _SourceFailed(f"no model store at {store.root}")
    manifest = store.get(name)
    if manifest is None:
        raise _SourceFailed(f"not installed in {store.root}")
    layer = manifest.model_layer
    if layer is None:
        raise _SourceFailed(f"installed in {store.root}, but its manifest has no model layer")
    try:
        blob = store.blob_path(layer.digest)
    except InvalidDigest:
        raise _SourceFailed(
            f"installed in {store.root}, but the model layer's digest {layer.digest!r} is invalid"
        ) from None
    try:
        header = read_gguf(blob)
        return spec_from_gguf(header, name=manifest.name, file_size_bytes=layer.size), str(blob)
    except GGUFError as exc:
        raise _SourceFailed(f"installed in {store.root}, but its model blob is unreadable: {exc}") from None


# ---------------------------------------------------------------------------------------------- api/show


def _request(url: str, body: dict[str, Any] | None, timeout_s: float) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            message = ""
        raise _SourceFailed(f"{url} answered {exc.code}" + (f": {message}" if message else "")) from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise _SourceFailed(f"{url} unreachable: {reason}") from None
    except ValueError:
        raise _SourceFailed(f"{url} answered something that is not JSON") from None


def _tags_size(base_url: str, name: str, timeout_s: float) -> int:
    tags = _request(f"{base_url}/api/tags", None, timeout_s)
    wanted = normalize_name(name).lower()
    entries = tags.get("models") if isinstance(tags, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        if isinstance(entry, dict) and normalize_name(str(entry.get("name", ""))).lower() == wanted:
            size = entry.get("size")
            if isinstance(size, int) and size > 0:
                return size
    raise _SourceFailed(f"{base_url}/api/tags does not list it with a size")


def _from_api_show(name: str, show_url: str, timeout_s: float) -> tuple[ModelSpec, str]:
    base_url = show_url.rstrip("/").removesuffix("/api/show")
    url = f"{base_url}/api/show"
    show = _request(url, {"model": name}, timeout_s)
    if not isinstance(show, dict):
        raise _SourceFailed(f"{url} answered something that is not an object")
    if needs_verbose(show):
        show = _request(url, {"model": name, "verbose": True}, timeout_s)
    size_bytes = _tags_size(base_url, name, timeout_s)
    try:
        return spec_from_show(name, show, size_bytes), url
    except ShowIncomplete as exc:
        raise _SourceFailed(f"{url}: {exc}") from None


# ------------------------------------------------------------------------------------------------ public


def lookup_model(
    name: str,
    *,
    models_dir: Path | str | None,
    show_url: str | None = None,
    timeout_s: float = DEFAULT_SHOW_TIMEOUT_S,
) -> ResolvedModel:
    """The model's facts from the store, then `/api/show` of `show_url` (a backend's base URL), then the
    catalog. Blocks for at most about 3 x `timeout_s` on an unresponsive backend. Raises ModelUnknown.
    """
    skipped: list[str] = []
    if models_dir is not None:
        try:
            spec, detail = _from_store(name, Path(models_dir))
            return ResolvedModel(spec, "store", detail, tuple(skipped))
        except _SourceFailed as exc:
            skipped.append(f"store: {exc}")
    if show_url:
        try:
            spec, detail = _from_api_show(name, show_url, timeout_s)
            return ResolvedModel(spec, "api-show", detail, tuple(skipped))
        except _SourceFailed as exc:
            skipped.append(f"api-show: {exc}")
    spec_or_none = find_model(name)
    if spec_or_none is not None:
        return ResolvedModel(spec_or_none, "catalog", "built-in catalog", tuple(skipped))
    skipped.append("catalog: not in the built-in catalog")
    raise ModelUnknown(f"model {normalize_name(name)!r} not found ({'; '.join(skipped)})")


def resolve_model(
    name: str,
    *,
    models_dir: Path | str | None,
    show_url: str | None = None,
    timeout_s: float = DEFAULT_SHOW_TIMEOUT_S,
) -> ModelSpec:
    """`lookup_model(...).spec`: the model's facts from the best source. Raises ModelUnknown."""
    return lookup_model(name, models_dir=models_dir, show_url=show_url, timeout_s=timeout_s).spec
