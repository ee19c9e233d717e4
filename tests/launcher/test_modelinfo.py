"""launcher.models.resolve: model facts from a real on-disk store, a running backend's /api/show, the catalog."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import socket
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from launcher.facts.catalog import find_model
from launcher.models.gguf import encode_gguf_metadata, gguf_metadata_for_spec
from launcher.models.resolve import ModelUnknown, lookup_model, resolve_model

GB = 1000**3


def _install(root: Path, name: str, blob: bytes, declared_size: int, *, model_layer: bool = True) -> Path:
    """Install a model the way Ollama lays it out on disk; returns the model blob's path."""
    digest = hashlib.sha256(blob).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    blob_path = root / "blobs" / f"sha256-{digest}"
    blob_path.write_bytes(blob)
    config = b'{"model_format":"gguf","model_family":"llama"}'
    config_digest = hashlib.sha256(config).hexdigest()
    (root / "blobs" / f"sha256-{config_digest}").write_bytes(config)
    layers = [{"mediaType": "application/vnd.ollama.image.template", "digest": f"sha256:{'0' * 64}", "size": 1}]
    if model_layer:
        layers.insert(
            0, {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": declared_size}
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "digest": f"sha256:{config_digest}",
            "size": len(config),
        },
        "layers": layers,
    }
    model, tag = name.rsplit(":", 1)
    parts = model.split("/")
    namespace, model = (parts[0], parts[1]) if len(parts) == 2 else ("library", parts[0])
    path = root / "manifests" / "registry.ollama.ai" / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blob_path


def _real_style_gguf(tmp_path: Path) -> bytes:
    """A llama.cpp-converted file's header: token array for the vocabulary, per-layer KV heads, tensors."""
    path = tmp_path / "converted.gguf"
    writer = gguf.GGUFWriter(str(path), "qwen3")
    writer.add_name("Qwen3 Tiny")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_block_count(4)
    writer.add_context_length(40960)
    writer.add_embedding_length(1024)
    writer.add_head_count(16)
    writer.add_head_count_kv([8, 8, 4, 8])
    writer.add_key_length(128)
    writer.add_value_length(128)
    writer.add_token_list([f"t{i}" for i in range(151_936)])
    writer.add_tensor("token_embd.weight", np.zeros((64, 16), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------------- store


def test_store_model_from_its_gguf_header(tmp_path: Path) -> None:
    blob = _install(tmp_path, "tiny-qwen:q8", _real_style_gguf(tmp_path), declared_size=640_000_000)
    found = lookup_model("tiny-qwen:q8", models_dir=tmp_path, show_url=None)
    assert found.source == "store"
    assert found.detail == str(blob)
    spec = found.spec
    assert spec.name == "tiny-qwen:q8"
    assert spec.family == "qwen3"
    assert spec.quantization == "Q8_0"
    assert spec.file_size_bytes == 640_000_000  # the manifest's declared size, not the blob we wrote
    assert (spec.block_count, spec.embedding_length, spec.context_length) == (4, 1024, 40960)
    assert (spec.head_count, spec.head_count_kv, spec.key_length) == (16, 8, 128)
    assert spec.vocab_size == 151_936
    assert spec.parameter_count == 64 * 16


def test_simulated_store_blob_gives_the_catalog_facts(tmp_path: Path) -> None:
    """A metadata-only blob (what the simulator installs) reads back as the catalog's model."""
    mixtral = find_model("mixtral:8x7b")
    assert mixtral is not None
    blob = encode_gguf_metadata(gguf_metadata_for_spec(mixtral))
    _install(tmp_path, "mixtral:8x7b", blob, declared_size=mixtral.file_size_bytes)
    found = lookup_model("mixtral:8x7b", models_dir=tmp_path)
    assert found.source == "store"
    assert found.spec == dataclasses.replace(mixtral, aliases=())


def test_store_names_resolve_like_ollama(tmp_path: Path) -> None:
    spec = find_model("llama3.2:3b")
    assert spec is not None
    blob = encode_gguf_metadata(gguf_metadata_for_spec(spec))
    _install(tmp_path, "myteam/assistant:latest", blob, declared_size=2 * GB)
    for asked in ("myteam/assistant", "myteam/assistant:latest", "MyTeam/Assistant"):
        found = lookup_model(asked, models_dir=tmp_path)
        assert (found.source, found.spec.name, found.spec.file_size_bytes) == (
            "store",
            "myteam/assistant:latest",
            2 * GB,
        )


def test_unusable_store_entries_fall_through_with_reasons(tmp_path: Path) -> None:
    _install(tmp_path, "llama3.1:8b", b'{"not": "gguf"}', declared_size=5 * GB)
    found = lookup_model("llama3.1:8b", models_dir=tmp_path)
    assert found.source == "catalog"
    assert len(found.skipped) == 1
    assert found.skipped[0].startswith(
        f"store: installed in {tmp_path}, but its model blob is unreadable: not a GGUF file"
    )

    _install(tmp_path, "qwen2.5:7b", b"", declared_size=0, model_layer=False)
    assert lookup_model("qwen2.5:7b", models_dir=tmp_path).skipped == (
        f"store: installed in {tmp_path}, but its manifest has no model layer",
    )
    assert lookup_model("gemma2:9b", models_dir=tmp_path).skipped == (f"store: not installed in {tmp_path}",)
    assert lookup_model("gemma2:9b", models_dir=tmp_path / "nowhere").skipped == (
        f"store: no model store at {tmp_path / 'nowhere'}",
    )


# ------------------------------------------------------------------------------------------------ /api/show


class FakeOllama:
    """Answers /api/show and /api/tags the way `ollama serve` does, and remembers what it received."""

    def __init__(self, show: dict[str, Any], tags: list[dict[str, Any]], verbose_show: dict[str, Any] | None = None):
        self.show = show
        self.verbose_show = verbose_show
        self.tags = tags
        self.show_requests: list[dict[str, Any]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/show", self.handle_show)
        app.router.add_get("/api/tags", self.handle_tags)
        return app

    async def handle_show(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.show_requests.append(body)
        if body.get("model") != self.show["name"]:
            return web.json_response({"error": f"model '{body.get('model')}' not found"}, status=404)
        answer = self.verbose_show if body.get("verbose") and self.verbose_show else self.show
        return web.json_response({k: v for k, v in answer.items() if k != "name"})

    async def handle_tags(self, request: web.Request) -> web.Response:
        return web.json_response({"models": self.tags})


def _show_answer(name: str, head_count_kv: Any = 8) -> dict[str, Any]:
    """A non-verbose /api/show for a llama-shaped model: arrays come back null, tensors are listed."""
    return {
        "name": name,
        "details": {"format": "gguf", "family": "llama", "parameter_size": "8.0B", "quantization_level": "Q4_K_M"},
        "model_info": {
            "general.architecture": "llama",
            "general.file_type": 15,
            "general.parameter_count": 8030261248,
            "general.quantization_version": 2,
            "llama.block_count": 32,
            "llama.context_length": 131072,
            "llama.embedding_length": 4096,
            "llama.attention.head_count": 32,
            "llama.attention.head_count_kv": head_count_kv,
            "llama.rope.freq_base": 500000,
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.tokens": None,
            "tokenizer.ggml.merges": None,
            "tokenizer.ggml.token_type": None,
        },
        "tensors": [
            {"name": "token_embd.weight", "type": "Q4_K", "shape": [4096, 128256]},
            {"name": "blk.0.attn_q.weight", "type": "Q4_K", "shape": [4096, 4096]},
        ],
        "capabilities": ["completion", "tools"],
    }


async def _serve(fake: FakeOllama) -> TestServer:
    server = TestServer(fake.app(), host="127.0.0.1", port=0)
    await server.start_server()
    return server


async def test_api_show_of_a_running_backend(tmp_path: Path) -> None:
    fake = FakeOllama(
        _show_answer("custom-llama:8b"), [{"name": "custom-llama:8b", "model": "custom-llama:8b", "size": 4920753328}]
    )
    server = await _serve(fake)
    try:
        url = str(server.make_url(""))
        found = await asyncio.to_thread(lookup_model, "custom-llama:8b", models_dir=tmp_path, show_url=url)
    finally:
        await server.close()
    assert found.source == "api-show"
    assert found.detail.endswith("/api/show")
    assert found.skipped == (f"store: no model store at {tmp_path}",)
    assert fake.show_requests == [{"model": "custom-llama:8b"}]
    spec = found.spec
    assert (spec.family, spec.quantization, spec.parameter_count) == ("llama", "Q4_K_M", 8030261248)
    assert (spec.block_count, spec.head_count, spec.head_count_kv, spec.context_length) == (32, 32, 8, 131072)
    assert spec.vocab_size == 128256  # from token_embd.weight: the token array is null in a non-verbose show
    assert spec.file_size_bytes == 4920753328


async def test_per_layer_heads_ask_for_a_verbose_show() -> None:
    plain = _show_answer("hybrid:3b", head_count_kv=None)
    verbose = _show_answer("hybrid:3b", head_count_kv=[0, 8, 8, 0, 8])
    fake = FakeOllama(plain, [{"name": "hybrid:3b", "size": 2 * GB}], verbose_show=verbose)
    server = await _serve(fake)
    try:
        spec = await asyncio.to_thread(
            resolve_model, "hybrid:3b", models_dir=None, show_url=str(server.make_url("/api/show"))
        )
    finally:
        await server.close()
    assert fake.show_requests == [{"model": "hybrid:3b"}, {"model": "hybrid:3b", "verbose": True}]
    assert spec.head_count_kv == 8


async def test_backend_that_lacks_the_model_falls_through_to_the_catalog() -> None:
    fake = FakeOllama(_show_answer("other:1b"), [])
    server = await _serve(fake)
    try:
        url = str(server.make_url(""))
        found = await asyncio.to_thread(lookup_model, "qwen2.5:7b", models_dir=None, show_url=url)
    finally:
        await server.close()
    assert found.source == "catalog"
    assert found.skipped == (f"api-show: {url.rstrip('/')}/api/show answered 404: model 'qwen2.5:7b' not found",)


def test_unreachable_backend_falls_through() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before use: nothing listens there
    found = lookup_model("gemma2:9b", models_dir=None, show_url=f"http://127.0.0.1:{port}", timeout_s=2)
    assert found.source == "catalog"
    assert found.skipped[0].startswith(f"api-show: http://127.0.0.1:{port}/api/show unreachable")


# --------------------------------------------------------------------------------------- catalog and errors


def test_catalog_fallback() -> None:
    found = lookup_model("llama3.1", models_dir=None)
    assert (found.source, found.detail, found.skipped) == ("catalog", "built-in catalog", ())
    assert found.spec == find_model("llama3.1:8b")
    assert resolve_model("nomic-embed-text", models_dir=None).embedding_only


def test_unknown_model_names_everything_tried(tmp_path: Path) -> None:
    (tmp_path / "manifests").mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ModelUnknown) as excinfo:
        resolve_model("no-such-model", models_dir=tmp_path, show_url=f"http://127.0.0.1:{port}", timeout_s=2)
    message = str(excinfo.value)
    assert message.startswith("model 'no-such-model:latest' not found (store: not installed in ")
    assert f"api-show: http://127.0.0.1:{port}/api/show unreachable" in message
    assert message.endswith("catalog: not in the built-in catalog)")
    assert isinstance(excinfo.value, LookupError)


def test_a_blob_that_cannot_be_opened_falls_through_with_its_reason(tmp_path: Path) -> None:
    blob = _install(tmp_path, "llama3.1:8b", b"GGUF", declared_size=5 * GB)
    blob.unlink()
    blob.symlink_to(blob)  # a loop: open() fails with ELOOP, which is neither "missing" nor "a directory"
    found = lookup_model("llama3.1:8b", models_dir=tmp_path)
    assert found.source == "catalog"
    assert found.skipped[0].startswith(f"store: installed in {tmp_path}, but its model blob is unreadable: ")
    assert "Too many levels of symbolic links" in found.skipped[0]
