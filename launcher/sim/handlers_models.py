"""Model management and status routes: /, /api/version, tags, show, ps, pull, push, delete, copy,
blobs, and the simulator's own GET /corral-sim/gpus (server/routes.go, HEAD)."""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from aiohttp import web

from launcher.facts.names import ModelName
from launcher.models.store import InvalidDigest, digest_of
from launcher.sim.gojson import (
    COPY_REQUEST,
    DELETE_REQUEST,
    PULL_REQUEST,
    PUSH_REQUEST,
    SHOW_REQUEST,
    format_datetime,
    format_time,
)
from launcher.sim.handlers_infer import SERVICE, HandlerError, read_request
from launcher.sim.models import InstalledModel, ModelLoadError, read_full_metadata
from launcher.sim.runner import FOREVER_NS, Runner
from launcher.sim.service import VERSION, ModelRefError, SimService, parse_model_ref
from launcher.sim.wire import (
    StreamError,
    empty_response,
    error_response,
    json_response,
    send_ndjson,
    text_response,
    wait_for_stream,
)


async def root(request: web.Request) -> web.Response:
    return text_response(200, "Ollama is running", content_type="text/plain; charset=utf-8")


async def version(request: web.Request) -> web.Response:
    return json_response({"version": VERSION})


# ---------------------------------------------------------------------------------------------
# Listing


def _tags_entry(model: InstalledModel) -> dict[str, Any]:
    details = model.details()
    details["parent_model"] = ""
    if model.spec.context_length:
        details["context_length"] = model.spec.context_length
    if model.spec.embedding_length:
        details["embedding_length"] = model.spec.embedding_length
    entry: dict[str, Any] = {
        "name": model.name,
        "model": model.name,
        "modified_at": format_datetime(model.manifest.modified_at),
        "size": model.manifest.size_bytes,
        "digest": model.manifest.digest,
        "details": details,
    }
    if model.capabilities:
        entry["capabilities"] = list(model.capabilities)
    return entry


def list_models(service: SimService) -> list[dict[str, Any]]:
    entries = []
    for manifest in service.store.list():
        try:
            model = service.installed(manifest.model_name)
        except ModelLoadError:
            continue
        if model is not None:
            entries.append((manifest.modified_at.timestamp(), _tags_entry(model)))
    entries.sort(key=lambda e: -int(e[0]))  # most recently modified first, by whole seconds like Ollama
    return [e for _, e in entries]


async def tags(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    models = await asyncio.to_thread(list_models, service)
    return json_response({"models": models})


def _ps_entry(service: SimService, runner: Runner) -> tuple[float, dict[str, Any]]:
    details = runner.model.details()
    details["parent_model"] = ""
    if runner.expires_at is not None:
        expires = runner.expires_at
    elif math.isinf(runner.session_s):
        expires = service.clock.wall_time() + FOREVER_NS / 1e9
    else:
        expires = service.clock.wall_time_after(runner.session_s)
    return expires, {
        "name": runner.model.name,
        "model": runner.model.name,
        "size": runner.size_bytes,
        "digest": runner.model.manifest.digest,
        "details": details,
        "expires_at": format_time(expires),
        "size_vram": runner.size_vram_bytes,
        "context_length": runner.context_length,
    }


async def ps(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    entries = [_ps_entry(service, r) for r in service.scheduler.loaded.values() if not r.unloaded]
    entries.sort(key=lambda e: -int(e[0]))  # longest time left first (by whole seconds, like Ollama)
    return json_response({"models": [e for _, e in entries]})


async def gpus(request: web.Request) -> web.Response:
    """What nvidia-smi would show for the cards this process sees (simulator-only route)."""
    service = request.app[SERVICE]
    used = service.scheduler.card_used_bytes()
    out = []
    for card in service.settings.cards:
        in_use = min(used.get(card.uuid, 0), card.memory_total_bytes)
        out.append(
            {
                "index": card.index,
                "uuid": card.uuid,
                "name": card.name,
                "memory_total": card.memory_total_bytes,
                "memory_used": in_use,
                "memory_free": card.memory_total_bytes - in_use,
            }
        )
    return json_response({"gpus": out})


# ---------------------------------------------------------------------------------------------
# Show


def _go_value(value: Any) -> str:
    """fmt's %#v for a JSON value decoded into `any` (strings quoted, numbers as float64)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _plain_value(value: Any) -> str:
    """fmt's %v."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _quote(text: str) -> str:
    """parser.quote: multi-line or space-padded values get quotes (triple when they contain one)."""
    if "\n" in text or text.startswith(" ") or text.endswith(" "):
        return f'"""{text}"""' if '"' in text else f'"{text}"'
    return text


def _param_items(params: dict[str, Any]) -> list[tuple[str, Any]]:
    items = []
    for key in sorted(params):
        value = params[key]
        for v in value if isinstance(value, list) else [value]:
            items.append((key, v))
    return items


def modelfile(service: SimService, model: InstalledModel, system: str) -> str:
    path = service.store.blob_path(model.key)
    lines = [
        '# Modelfile generated by "ollama show"',
        "# To build a new Modelfile based on this, replace FROM with:",
        f"# FROM {model.name}",
        "",
        f"FROM {path}",
        f"TEMPLATE {_quote(model.template)}",
    ]
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f"PARAMETER {k} {_quote(_plain_value(v))}" for k, v in _param_items(model.params)]
    lines += [f"LICENSE {_quote(text)}" for text in model.license]
    for message in model.messages:
        lines.append(f"MESSAGE {message.get('role', '')} {_quote(str(message.get('content', '')))}")
    return "\n".join(lines) + "\n"


def show_response(
    service: SimService, model: InstalledModel, *, system: str = "", full_metadata: dict[str, object] | None = None
) -> dict:
    """api.ShowResponse; `full_metadata` (the header with every array) makes it a verbose show."""
    system = system or model.system
    out: dict[str, Any] = {}
    license_text = "\n".join(model.license)
    if license_text:
        out["license"] = license_text
    out["modelfile"] = modelfile(service, model, system)
    params = "\n".join(f"{k:<30} {_go_value(v)}" for k, v in _param_items(model.params))
    if params:
        out["parameters"] = params
    if model.template:
        out["template"] = model.template
    if system:
        out["system"] = system
    out["details"] = model.details()
    if model.messages:
        out["messages"] = [{"role": m.get("role", ""), "content": m.get("content", "")} for m in model.messages]
    out["model_info"] = model.model_info(full_metadata=full_metadata)
    if tensors := model.tensors(service.store):
        out["tensors"] = tensors
    if model.capabilities:
        out["capabilities"] = list(model.capabilities)
    out["modified_at"] = format_datetime(model.manifest.modified_at)
    return out


async def show(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await read_request(request, SHOW_REQUEST, "ShowRequest")
        requested = str(body.get("model") or body.get("name") or "")
        if not requested:
            raise HandlerError(400, "model is required")
        try:
            ref = parse_model_ref(requested)
        except ModelRefError as e:
            raise HandlerError(400, str(e)) from None
        display = ref.name.display
        try:
            model = service.installed(ref.name)
        except ModelLoadError as e:
            raise HandlerError(500, str(e)) from None
        if model is None:
            raise HandlerError(404, f"model '{display}' not found")
        full = await asyncio.to_thread(read_full_metadata, service.store, model) if body.get("verbose") else None
        reply = show_response(service, model, system=str(body.get("system") or ""), full_metadata=full)
        return json_response(reply)
    except HandlerError as e:
        return e.response()


# ---------------------------------------------------------------------------------------------
# Pull, push, delete, copy


def _pull_name(raw: str) -> ModelName:
    try:
        return parse_model_ref(raw).name
    except ModelRefError as e:
        raise HandlerError(400, str(e) if e.kind == "conflict" else "invalid model name") from None


async def pull(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    try:
        body = await read_request(request, PULL_REQUEST, "PullRequest")
        name = _pull_name(str(body.get("model") or body.get("name") or ""))
    except HandlerError as e:
        return e.response()
    stored = service.store.resolve(name.full)
    if stored is not None:
        name = stored
    items = service.pulls.pull(name)
    if body.get("stream") is False:
        return await wait_for_stream(items)
    return await send_ndjson(request, items)


async def push(request: web.Request) -> web.StreamResponse:
    try:
        body = await read_request(request, PUSH_REQUEST, "PushRequest")
    except HandlerError as e:
        return e.response()
    name = str(body.get("model") or body.get("name") or "")
    if not name:
        return error_response(400, "model is required")

    async def items() -> Any:
        yield {"status": "retrieving manifest"}
        yield StreamError("push is not supported by the simulated backend (it has no registry to push to)")

    if body.get("stream") is False:
        return await wait_for_stream(items())
    return await send_ndjson(request, items())


async def delete(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await read_request(request, DELETE_REQUEST, "DeleteRequest")
    except HandlerError as e:
        return e.response()
    raw = str(body.get("model") or body.get("name") or "")
    try:
        name = parse_model_ref(raw).name
    except ModelRefError as e:
        message = f'name "{raw}" is invalid' if e.kind == "invalid" else str(e)
        return error_response(400, message)
    model = service.store.get(name.full)
    if model is None:
        return error_response(404, f"model '{raw}' not found")
    # Like Ollama, a loaded copy stays loaded until its keep-alive runs out.
    deleted = await asyncio.to_thread(service.store.delete, name.full)
    if not deleted:
        return error_response(404, f"model '{raw}' not found")
    return empty_response(200)


async def copy(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    try:
        body = await read_request(request, COPY_REQUEST, "CopyRequest")
    except HandlerError as e:
        return e.response()
    source, destination = str(body.get("source") or ""), str(body.get("destination") or "")
    src, dst = ModelName.parse(source), ModelName.parse(destination)
    if not src.is_valid:
        return error_response(400, f'source "{source}" is invalid')
    if not dst.is_valid:
        return error_response(400, f'destination "{destination}" is invalid')
    if not await asyncio.to_thread(service.store.copy, src.full, dst.full):
        return error_response(404, f'model "{source}" not found')
    return empty_response(200)


# ---------------------------------------------------------------------------------------------
# Blobs


async def head_blob(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    digest = request.match_info["digest"]
    try:
        path = service.store.blob_path(digest)
    except InvalidDigest as e:
        return error_response(400, str(e))
    if not path.is_file():
        return error_response(404, f'blob "{digest}" not found')
    return empty_response(200)


async def create_blob(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    digest = request.match_info["digest"]
    try:
        path = service.store.blob_path(digest)
    except InvalidDigest as e:
        return error_response(400, str(e))
    if path.is_file():
        return empty_response(200)
    data = await request.read()
    actual = digest_of(data)
    if actual != digest:
        return error_response(400, f'digest mismatch, expected "{digest}", got "{actual}"')
    await asyncio.to_thread(service.store.write_blob, data)
    return empty_response(201)


# Re-exported for the route table.
__all__ = [
    "copy",
    "create_blob",
    "delete",
    "gpus",
    "head_blob",
    "list_models",
    "ps",
    "pull",
    "push",
    "root",
    "show",
    "show_response",
    "tags",
    "version",
]
