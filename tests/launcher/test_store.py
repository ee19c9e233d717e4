"""The Ollama model store: layout, names, digests, atomic writes shared between processes."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from launcher.facts.names import ModelName
from launcher.models.store import (
    MEDIA_TYPE_CONFIG,
    MEDIA_TYPE_MODEL,
    MEDIA_TYPE_TEMPLATE,
    InvalidDigest,
    Layer,
    ModelStore,
)
from launcher.sim.harness import install_models


def _install(store: ModelStore, name: str, model_bytes: bytes = b"GGUF-model", declared: int = 0) -> None:
    model = store.write_blob(model_bytes)
    template = store.write_blob(b"{{ .Prompt }}")
    config = store.write_blob(b'{"model_format":"gguf"}')
    store.write_manifest(
        name,
        Layer(MEDIA_TYPE_CONFIG, config, 23),
        [Layer(MEDIA_TYPE_MODEL, model, declared or len(model_bytes)), Layer(MEDIA_TYPE_TEMPLATE, template, 13)],
    )


@pytest.mark.parametrize(
    ("text", "display", "path"),
    [
        ("llama3.1", "llama3.1:latest", "registry.ollama.ai/library/llama3.1/latest"),
        ("llama3.1:8b", "llama3.1:8b", "registry.ollama.ai/library/llama3.1/8b"),
        ("me/tuned:v2", "me/tuned:v2", "registry.ollama.ai/me/tuned/v2"),
        ("hf.co/org/model:Q4", "hf.co/org/model:Q4", "hf.co/org/model/Q4"),
        ("localhost:5000/ns/m:t", "localhost:5000/ns/m:t", "localhost:5000/ns/m/t"),
    ],
)
def test_names_map_to_ollamas_manifest_paths(text: str, display: str, path: str) -> None:
    name = ModelName.parse(text)
    assert name.is_valid
    assert name.display == display
    assert name.relpath == Path(path)


@pytest.mark.parametrize("text", ["", "bad name", "a/b/c/d", ":tag", "model:", "-x", "ns.dot/model"])
def test_invalid_names_are_refused(text: str) -> None:
    assert not ModelName.parse(text).is_valid


def test_manifest_layout_digest_and_size(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _install(store, "llama3.1:8b", declared=4_920_000_000)
    path = tmp_path / "manifests/registry.ollama.ai/library/llama3.1/8b"
    doc = json.loads(path.read_bytes())
    assert doc["schemaVersion"] == 2
    assert doc["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert [x["mediaType"] for x in doc["layers"]] == [MEDIA_TYPE_MODEL, MEDIA_TYPE_TEMPLATE]
    m = store.get("llama3.1:8b")
    assert m is not None
    assert m.name == "llama3.1:8b"
    # /api/tags shows the sha256 of the manifest file and the sum of declared layer and config sizes.
    assert m.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert m.size_bytes == 4_920_000_000 + 13 + 23
    assert m.model_layer is not None and m.model_layer.size == 4_920_000_000
    assert store.blob_path(m.model_layer.digest).read_bytes() == b"GGUF-model"
    assert (tmp_path / "blobs" / ("sha256-" + m.model_layer.digest[7:])).is_file()


def test_lookup_defaults_the_tag_and_ignores_case(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _install(store, "Mistral")
    assert store.get("mistral") is not None
    assert store.get("MISTRAL:latest") is not None
    assert store.get("mistral:7b") is None
    assert [m.name for m in store.list()] == ["Mistral:latest"]


def test_blob_digests_are_checked(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    with pytest.raises(InvalidDigest):
        store.blob_path("sha256:1234")
    digest = store.write_blob(b"abc")
    assert digest == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert store.blob_path(digest) == store.blob_path(digest.replace(":", "-"))
    assert store.has_blob(digest)


def test_delete_prunes_only_unshared_blobs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _install(store, "a:1", b"model-a")
    _install(store, "b:1", b"model-b")  # shares the template and config blobs with a:1
    a = store.get("a:1")
    assert a is not None and a.model_layer is not None
    assert store.delete("a:1")
    assert store.get("a:1") is None
    assert not store.blob_path(a.model_layer.digest).exists()
    b = store.get("b:1")
    assert b is not None
    assert all(store.blob_path(layer.digest).exists() for layer in b.layers)
    assert not (tmp_path / "manifests/registry.ollama.ai/library/a").exists()  # empty dirs pruned
    assert not store.delete("a:1")


def test_noprune_keeps_blobs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path, prune=False)
    _install(store, "a:1", b"model-a")
    digest = store.write_blob(b"model-a")
    assert store.delete("a:1")
    assert store.has_blob(digest)


def test_copy_shares_blobs_and_keeps_the_digest(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _install(store, "a:1")
    assert store.copy("a:1", "me/a-copy:v1")
    src, dst = store.get("a:1"), store.get("me/a-copy:v1")
    assert src is not None and dst is not None
    assert dst.digest == src.digest
    assert dst.name == "me/a-copy:v1"
    assert not store.copy("missing", "x")


def test_startup_prune_spares_recent_blobs(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    orphan = store.write_blob(b"orphan")
    assert store.prune_unused_blobs() == []  # younger than the grace period: maybe another pull's
    old = 1_000_000.0
    os.utime(store.blob_path(orphan), (old, old))
    assert store.prune_unused_blobs() == [orphan]


def test_unreadable_manifests_are_skipped(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    _install(store, "good:1")
    bad = tmp_path / "manifests/registry.ollama.ai/library/bad/1"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    (bad.parent / ".tmp-abc").write_text("partial")
    assert [m.name for m in store.list()] == ["good:1"]
    assert store.get("bad:1") is None


def _pull_many(models_dir: str, rounds: int) -> None:
    for _ in range(rounds):
        install_models(Path(models_dir), "qwen2.5:0.5b", "nomic-embed-text")


def test_concurrent_installs_from_several_processes_leave_one_valid_manifest(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_pull_many, args=(str(tmp_path), 15)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    store = ModelStore(tmp_path)
    names = sorted(m.name for m in store.list())
    assert names == ["nomic-embed-text:latest", "qwen2.5:0.5b"]
    for m in store.list():
        for layer in (*m.layers, m.config):
            data = store.blob_path(layer.digest).read_bytes()
            assert "sha256:" + hashlib.sha256(data).hexdigest() == layer.digest
    leftovers = [p for p in tmp_path.rglob(".tmp-*")]
    assert leftovers == []
