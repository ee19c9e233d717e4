"""POST /api/create (server/create.go): a new model from an installed one, or from an uploaded GGUF blob.

`from` reuses the source's blobs (pulling it first when it is a catalog model that is not installed)
and layers the request's template, system prompt, license, parameters and messages on top; `files`
takes a GGUF blob uploaded with POST /api/blobs. Progress statuses follow Ollama's: "using existing
layer sha256:...", "creating new layer sha256:...", "writing manifest", "success".

One deliberate difference: Ollama re-declares a reused layer's size from the blob on disk; a pulled
simulated model's blob is a small stand-in for the real file, so the created model keeps the size its
source declared (otherwise it would look a few hundred bytes big).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from launcher.facts.names import ModelName
from launcher.models.gguf import (
    GGUFError,
    encode_gguf_metadata,
    file_type_name,
    file_type_number,
    read_gguf_metadata,
    spec_from_gguf,
)
from launcher.models.store import (
    MEDIA_TYPE_ADAPTER,
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_LICENSE,
    MEDIA_TYPE_MESSAGES,
    MEDIA_TYPE_MODEL,
    MEDIA_TYPE_PARAMS,
    MEDIA_TYPE_PROJECTOR,
    MEDIA_TYPE_SYSTEM,
    MEDIA_TYPE_TEMPLATE,
    InvalidDigest,
    Layer,
    digest_of,
)
from launcher.sim.gojson import CREATE_REQUEST, json_kind
from launcher.sim.handlers_infer import SERVICE, HandlerError, read_request
from launcher.sim.service import ModelRefError, SimService, parse_model_ref
from launcher.sim.wire import Items, StreamError, send_ndjson, wait_for_stream


def human_number(n: int) -> str:
    """format.HumanNumber: 8030261248 -> "8.0B", 137000000 -> "137M", 494032768 -> "494.03M"."""
    if n >= 1_000_000_000:
        x = n / 1e9
        return f"{x:.0f}B" if x == int(x) else f"{x:.1f}B"
    if n >= 1_000_000:
        x = n / 1e6
        return f"{x:.0f}M" if x == int(x) else f"{x:.2f}M"
    if n >= 1000:
        return f"{n / 1000:.0f}K"
    return str(n)


def _valid_path(path: str) -> bool:
    """io/fs.ValidPath: a clean, relative, slash-separated path."""
    if path == ".":
        return True
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts)


class _Layers:
    """The layer list being built, with the progress status each layer earned."""

    def __init__(self, service: SimService) -> None:
        self.service = service
        self.layers: list[Layer] = []
        self.statuses: list[str] = []

    def reuse(self, layer: Layer) -> None:
        self.layers.append(layer)
        self.statuses.append(f"using existing layer {layer.digest}")

    def put(self, media_type: str, data: bytes, *, replace: bool = True) -> None:
        if replace:
            kept = [
                (lay, st) for lay, st in zip(self.layers, self.statuses, strict=True) if lay.media_type != media_type
            ]
            self.layers, self.statuses = [lay for lay, _ in kept], [st for _, st in kept]
        existed = self.service.store.has_blob(digest_of(data))
        digest = self.service.store.write_blob(data)
        self.layers.append(Layer(media_type, digest, len(data)))
        self.statuses.append(f"{'using existing' if existed else 'creating new'} layer {digest}")

    def find(self, media_type: str) -> Layer | None:
        return next((lay for lay in reversed(self.layers) if lay.media_type == media_type), None)


# Average bits per weight of the quantized types we can "produce", to scale the declared size.
_BITS_PER_WEIGHT = {"F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69,
                    "Q4_K_M": 4.85, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q3_K_M": 3.91, "Q2_K": 3.35}  # fmt: skip


def _quantized(
    service: SimService, built: _Layers, meta: dict[str, object], layer: Layer, source: str, target: str
) -> Layer:
    """A stand-in for llama-quantize: the same header with the new file type, the size scaled by bits."""
    number = file_type_number(target)  # raises GGUFError for an unknown type
    data = encode_gguf_metadata({**meta, "general.file_type": number, "general.quantization_version": 2})
    digest = service.store.write_blob(data)
    ratio = _BITS_PER_WEIGHT.get(target, 4.85) / _BITS_PER_WEIGHT.get(source, 16.0)
    quantized = Layer(MEDIA_TYPE_MODEL, digest, int(layer.size * ratio))
    index = built.layers.index(layer)
    built.layers[index] = quantized
    built.statuses[index] = f"creating new layer {digest}"
    return quantized


def _gguf_media_type(header: dict[str, object]) -> str:
    """ggufLayersWithMediaType: an adapter, a projector (isProjectorGGUF) or the model itself."""
    arch = header.get("general.architecture")
    kind = header.get("general.type")

    def count(key: str) -> int:
        value = header.get(f"{arch}.{key}")
        return value if isinstance(value, int) else 0

    if kind == "adapter":
        return MEDIA_TYPE_ADAPTER
    if kind in ("projector", "mmproj") or (count("block_count") == 0 and count("vision.block_count") > 0):
        return MEDIA_TYPE_PROJECTOR
    encoder = header.get(f"{arch}.has_vision_encoder") is True or header.get(f"{arch}.has_audio_encoder") is True
    if arch == "clip" and count("block_count") == 0 and encoder:
        return MEDIA_TYPE_PROJECTOR
    return MEDIA_TYPE_MODEL


def _licenses(value: Any) -> list[str]:
    """createModel's license handling: a non-empty string, or anything that decodes as []string (Go's
    json error text otherwise, raised as ValueError)."""
    if value is None or isinstance(value, str):
        return [value] if value else []
    if not isinstance(value, list):
        raise ValueError(f"json: cannot unmarshal {json_kind(value)} into Go value of type []string")
    for item in value:
        if item is not None and not isinstance(item, str):
            raise ValueError(f"json: cannot unmarshal {json_kind(item)} into Go value of type string")
    return [item or "" for item in value]


def _json_bytes(value: Any) -> bytes:
    return (json.dumps(value, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


async def _create(service: SimService, name: ModelName, body: dict[str, Any]) -> Items:
    store = service.store
    old = store.get(name.full)
    built = _Layers(service)
    config: dict[str, Any] = {
        "model_format": "",
        "model_family": "",
        "model_families": None,
        "model_type": "",
        "file_type": "",
    }
    source = str(body.get("from") or "")
    if source:
        try:
            src_name = parse_model_ref(source).name
        except ModelRefError:
            yield StreamError("invalid model name", 400)
            return
        manifest = store.get(src_name.full)
        if manifest is None:
            async for item in service.pulls.pull(src_name):
                yield item
                if isinstance(item, StreamError):
                    return
            manifest = store.get(src_name.full)
            if manifest is None:
                yield StreamError(f"model '{source}' not found")
                return
        for layer in manifest.layers:
            built.reuse(Layer(layer.media_type, layer.digest, layer.size, from_=manifest.name, name=layer.name))
        try:
            base_config = json.loads(store.read_blob(manifest.config.digest)) if manifest.config.digest else {}
        except (OSError, ValueError, InvalidDigest):
            base_config = {}
        for key in ("renderer", "parser", "requires", "model_format", "capabilities"):
            if isinstance(base_config, dict) and base_config.get(key):
                config[key] = base_config[key]
    elif isinstance(body.get("files"), dict) and body["files"]:
        for _path, digest in body["files"].items():
            yield {"status": "parsing GGUF"}
            try:
                blob = store.blob_path(str(digest))
            except InvalidDigest:
                yield StreamError("invalid digest format", 400)
                return
            if not blob.is_file():
                yield StreamError(f"open {blob}: no such file or directory")
                return
            try:
                header = await asyncio.to_thread(read_gguf_metadata, blob)
            except GGUFError:
                yield StreamError("supplied file was not in GGUF format", 400)
                return
            digest_text = "sha256:" + blob.name[len("sha256-") :]
            built.reuse(Layer(_gguf_media_type(header), digest_text, blob.stat().st_size))
    else:
        yield StreamError("neither 'from' or 'files' was specified", 400)
        return

    model_layer = built.find(MEDIA_TYPE_MODEL)
    quantize = str(body.get("quantize") or body.get("quantization") or "").upper()
    if model_layer is not None:
        try:
            meta = await asyncio.to_thread(read_gguf_metadata, store.blob_path(model_layer.digest))
            if quantize:
                raw_type = meta.get("general.file_type")
                source_type = file_type_name(raw_type) if isinstance(raw_type, int) else "unknown"
                if source_type not in ("F16", "BF16", "F32"):
                    yield StreamError("quantization is only supported for F16, BF16 and F32 models")
                    return
                if quantize != source_type:
                    yield {"status": f"quantizing {source_type} model to {quantize}"}
                    model_layer = _quantized(service, built, meta, model_layer, source_type, quantize)
                    meta = read_gguf_metadata(store.blob_path(model_layer.digest))
            spec = spec_from_gguf(meta, name=name.display, file_size_bytes=model_layer.size)
            config["model_format"] = config.get("model_format") or "gguf"
            config["model_family"] = spec.family
            config["model_families"] = [spec.family]
            config["model_type"] = human_number(spec.parameter_count)
            config["file_type"] = spec.quantization
        except GGUFError as e:
            if quantize:
                yield StreamError(str(e), 400)
                return
        except OSError:
            pass

    if body.get("template"):
        built.put(MEDIA_TYPE_TEMPLATE, str(body["template"]).encode())
    if body.get("system"):
        built.put(MEDIA_TYPE_SYSTEM, str(body["system"]).encode())
    try:
        licenses = _licenses(body.get("license"))
    except ValueError as e:
        yield StreamError(str(e))
        return
    for text in licenses:
        built.put(MEDIA_TYPE_LICENSE, text.encode(), replace=False)
    params = dict(body.get("parameters") or {})
    existing_params = built.find(MEDIA_TYPE_PARAMS)
    if existing_params is not None:
        try:
            previous = json.loads(store.read_blob(existing_params.digest))
        except (OSError, ValueError):
            previous = {}
        for key, value in (previous if isinstance(previous, dict) else {}).items():
            params.setdefault(key, value)
    if params:
        built.put(MEDIA_TYPE_PARAMS, _json_bytes(params))
    if body.get("messages"):
        messages = [{"role": m.get("role", ""), "content": m.get("content", "")} for m in body["messages"] if m]
        built.put(MEDIA_TYPE_MESSAGES, _json_bytes(messages))

    config_doc = {
        k: v for k, v in config.items() if v or k in ("model_format", "model_family", "model_type", "file_type")
    }
    config_doc.setdefault("model_families", None)
    config_doc |= {"architecture": "amd64", "os": "linux"}
    config_data = _json_bytes(config_doc)
    config_digest = store.write_blob(config_data)
    for status in built.statuses:
        yield {"status": status}
    yield {"status": "writing manifest"}
    written = await asyncio.to_thread(
        store.write_manifest, name.full, Layer(MEDIA_TYPE_CONFIG, config_digest, len(config_data)), built.layers
    )
    if old is not None and store.prune:
        in_use: set[str] = set()
        for m in store.list():
            in_use |= m.digests
        for digest in old.digests - in_use - written.digests:
            store.blob_path(digest).unlink(missing_ok=True)
    yield {"status": "success"}


async def create(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    try:
        body = await read_request(request, CREATE_REQUEST, "CreateRequest")
        for mapping in (body.get("files"), body.get("adapters"), body.get("draft_files")):
            for path, digest in (mapping or {}).items():
                if mapping is not body.get("adapters") and not _valid_path(str(path)):
                    raise HandlerError(400, "file path must be relative")
                if not digest:
                    raise HandlerError(400, "invalid digest format")
        name = ModelName.parse(str(body.get("model") or body.get("name") or ""))
        if not name.is_valid:
            raise HandlerError(400, "invalid model name")
    except HandlerError as e:
        return e.response()
    name = service.store.resolve(name.full) or name
    items = _create(service, name, body)
    if body.get("stream") is False:
        return await wait_for_stream(items)
    return await send_ndjson(request, items)
