"""Ollama's on-disk model store (OLLAMA_MODELS): manifests and content-addressed blobs.

Layout, as Ollama writes it (manifest/paths.go, manifest/manifest.go):

    <root>/manifests/<host>/<namespace>/<model>/<tag>   JSON manifest (schemaVersion 2)
    <root>/blobs/sha256-<hex>                           layer contents, named by their sha256

The launcher reads model sizes from here (the model layer's declared `size` is the GGUF file size),
and every simulated backend of a rig shares one store, as real Ollama backends do. Several processes
may therefore write at once: every write goes to a temporary file in the destination directory, is
fsynced and then renamed over the target, so a reader sees the old file or the new one, never half of
one. Two concurrent pulls of the same model write identical bytes and both succeed.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from launcher.facts.names import DEFAULT_HOST, DEFAULT_NAMESPACE, ModelName

MEDIA_TYPE_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_TYPE_CONFIG = "application/vnd.docker.container.image.v1+json"
MEDIA_TYPE_MODEL = "application/vnd.ollama.image.model"
MEDIA_TYPE_TEMPLATE = "application/vnd.ollama.image.template"
MEDIA_TYPE_PARAMS = "application/vnd.ollama.image.params"
MEDIA_TYPE_SYSTEM = "application/vnd.ollama.image.system"
MEDIA_TYPE_LICENSE = "application/vnd.ollama.image.license"
MEDIA_TYPE_MESSAGES = "application/vnd.ollama.image.messages"
MEDIA_TYPE_PROJECTOR = "application/vnd.ollama.image.projector"
MEDIA_TYPE_ADAPTER = "application/vnd.ollama.image.adapter"

# Ollama's PruneLayers skips blobs younger than this: they may belong to another process that has
# not written its manifest yet (server/images.go layerPruneGracePeriod).
PRUNE_GRACE_S = 3600.0

_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")


class InvalidDigest(ValueError):
    """A digest that is not `sha256:<64 hex>` (Ollama: "invalid digest format")."""

    def __init__(self, digest: str) -> None:
        super().__init__("invalid digest format")
        self.digest = digest


# ---------------------------------------------------------------------------------------------
# Manifest types


@dataclass(frozen=True)
class Layer:
    """One manifest entry: a blob by digest with its media type and declared size in bytes."""

    media_type: str
    digest: str  # "sha256:<hex>"
    size: int
    from_: str = ""  # JSON "from": the model a layer was taken from (set by /api/create)
    name: str = ""

    def to_json(self) -> dict[str, Any]:
        # Field order and omitempty exactly as manifest.Layer marshals.
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.from_:
            out["from"] = self.from_
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Layer:
        return cls(
            media_type=str(data.get("mediaType", "")),
            digest=str(data.get("digest", "")),
            size=int(data.get("size", 0)),
            from_=str(data.get("from", "")),
            name=str(data.get("name", "")),
        )


@dataclass(frozen=True)
class Manifest:
    """An installed model: its manifest as read from the store."""

    name: str  # display name, e.g. "llama3.1:8b"
    digest: str  # sha256 hex of the manifest file's bytes (what /api/tags shows; no "sha256:" prefix)
    modified_at: datetime  # the manifest file's mtime, UTC
    config: Layer
    layers: tuple[Layer, ...]
    path: Path = field(compare=False)
    model_name: ModelName = field(compare=False, default=ModelName(DEFAULT_HOST, DEFAULT_NAMESPACE, "", ""))

    @property
    def model_layer(self) -> Layer | None:
        return self.layer(MEDIA_TYPE_MODEL)

    def layer(self, media_type: str) -> Layer | None:
        """The last layer of that media type (later layers override earlier ones, as in GetModel)."""
        found = None
        for layer in self.layers:
            if layer.media_type == media_type:
                found = layer
        return found

    @property
    def size_bytes(self) -> int:
        """Sum of the declared sizes of all layers and the config, like Ollama's `Manifest.Size()`."""
        return sum(layer.size for layer in self.layers) + self.config.size

    @property
    def digests(self) -> set[str]:
        return {layer.digest for layer in (*self.layers, self.config) if layer.digest}


def manifest_bytes(config: Layer, layers: Sequence[Layer]) -> bytes:
    """The manifest file as Ollama's WriteManifest encodes it (json.Encoder: compact, trailing newline)."""
    doc = {
        "schemaVersion": 2,
        "mediaType": MEDIA_TYPE_MANIFEST,
        "config": config.to_json(),
        "layers": [layer.to_json() for layer in layers],
    }
    return (json.dumps(doc, separators=(",", ":"), ensure_ascii=False) + "\n").encode()


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------
# The store


def _atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, fsync, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class ModelStore:
    """Read and write an Ollama model store rooted at `root` (the OLLAMA_MODELS directory).

    Safe to share between processes: writes are atomic renames. `prune=False` mirrors OLLAMA_NOPRUNE
    (deleting a model then leaves its blobs behind).
    """

    def __init__(self, root: Path | str, *, prune: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.prune = prune

    @property
    def manifests_dir(self) -> Path:
        return self.root / "manifests"

    @property
    def blobs_dir(self) -> Path:
        return self.root / "blobs"

    # -- blobs ------------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        """Path of a blob; accepts "sha256:<hex>" or "sha256-<hex>". Raises InvalidDigest otherwise."""
        m = _DIGEST.match(digest)
        if not m:
            raise InvalidDigest(digest)
        return self.blobs_dir / f"sha256-{m.group(1)}"

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def write_blob(self, data: bytes) -> str:
        """Store `data` as a blob (no-op when present) and return its digest "sha256:<hex>"."""
        digest = digest_of(data)
        path = self.blob_path(digest)
        if path.is_file() and path.stat().st_size == len(data):
            with contextlib.suppress(OSError):
                os.utime(path)  # like touchLayer: a fresh mtime keeps the startup prune away
            return digest
        _atomic_write(path, data)
        return digest

    def read_blob(self, digest: str) -> bytes:
        return self.blob_path(digest).read_bytes()

    def blob_digests(self) -> builtins.list[str]:
        if not self.blobs_dir.is_dir():
            return []
        out = []
        for p in self.blobs_dir.iterdir():
            if p.is_file() and _DIGEST.match(p.name):
                out.append("sha256:" + p.name[len("sha256-") :])
        return sorted(out)

    # -- manifests --------------------------------------------------------------------------

    def _iter_manifest_paths(self) -> Iterator[tuple[ModelName, Path]]:
        if not self.manifests_dir.is_dir():
            return
        for path in sorted(self.manifests_dir.glob("*/*/*/*")):
            if not path.is_file():
                continue
            host, namespace, model, tag = path.relative_to(self.manifests_dir).parts
            name = ModelName(host, namespace, model, tag)
            if name.is_valid:  # skips our own ".tmp-" files and anything Ollama would not accept
                yield name, path

    def _read(self, name: ModelName, path: Path) -> Manifest | None:
        try:
            raw = path.read_bytes()
            mtime = path.stat().st_mtime
            doc = json.loads(raw)
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict):
            return None
        config = doc.get("config") or {}
        layers = doc.get("layers") or []
        if not isinstance(config, dict) or not isinstance(layers, list):
            return None
        try:
            parsed_layers = tuple(Layer.from_json(x) for x in layers if isinstance(x, dict))
            config_layer = Layer.from_json(config)
        except (TypeError, ValueError):
            return None
        return Manifest(
            name=name.display,
            digest=hashlib.sha256(raw).hexdigest(),
            modified_at=datetime.fromtimestamp(mtime, UTC),
            config=config_layer,
            layers=parsed_layers,
            path=path,
            model_name=name,
        )

    def list(self) -> builtins.list[Manifest]:
        """Every readable manifest, by name. Unreadable or half-understood files are skipped."""
        out = []
        for name, path in self._iter_manifest_paths():
            m = self._read(name, path)
            if m is not None:
                out.append(m)
        return out

    def resolve(self, name: str) -> ModelName | None:
        """The stored spelling of `name` (matched ignoring case), or None when it is not installed."""
        wanted = ModelName.parse(name)
        if not wanted.is_valid:
            return None
        exact = self.manifests_dir / wanted.relpath
        if exact.is_file():
            return wanted
        for stored, _path in self._iter_manifest_paths():
            if stored.key() == wanted.key():
                return stored
        return None

    def get(self, name: str) -> Manifest | None:
        """The manifest of an installed model ("llama3.1" means "llama3.1:latest"), or None."""
        stored = self.resolve(name)
        if stored is None:
            return None
        return self._read(stored, self.manifests_dir / stored.relpath)

    def write_manifest(self, name: str, config_layer: Layer, layers: Sequence[Layer]) -> Manifest:
        """Write (or replace) the manifest for `name` atomically and return it as read back."""
        parsed = ModelName.parse(name)
        if not parsed.is_valid:
            raise ValueError(f"invalid model name {name!r}")
        target = self.resolve(name) or parsed
        path = self.manifests_dir / target.relpath
        _atomic_write(path, manifest_bytes(config_layer, layers))
        written = self._read(target, path)
        if written is None:  # pragma: no cover - we just wrote it
            raise OSError(f"manifest {path} unreadable after write")
        return written

    def delete(self, name: str) -> bool:
        """Remove a model's manifest; then its blobs that no other manifest uses (unless prune=False).

        Returns False when the model is not installed.
        """
        m = self.get(name)
        if m is None:
            return False
        try:
            m.path.unlink()
        except FileNotFoundError:
            return False
        self._prune_dirs(m.path.parent)
        if self.prune:
            in_use: set[str] = set()
            for other in self.list():
                in_use |= other.digests
            for digest in m.digests - in_use:
                with contextlib.suppress(FileNotFoundError, InvalidDigest):
                    self.blob_path(digest).unlink()
        return True

    def copy(self, src: str, dst: str) -> bool:
        """Copy a manifest byte for byte under a new name (blobs are shared). False when `src` is missing."""
        source = self.get(src)
        if source is None:
            return False
        parsed = ModelName.parse(dst)
        if not parsed.is_valid:
            raise ValueError(f"invalid model name {dst!r}")
        target = self.resolve(dst) or parsed
        path = self.manifests_dir / target.relpath
        if path == source.path:
            return True
        _atomic_write(path, source.path.read_bytes())
        return True

    def prune_unused_blobs(self, *, grace_s: float = PRUNE_GRACE_S) -> builtins.list[str]:
        """Remove blobs no manifest references and older than `grace_s` (Ollama's startup prune)."""
        in_use: set[str] = set()
        for m in self.list():
            in_use |= m.digests
        removed = []
        now = time.time()
        for digest in self.blob_digests():
            if digest in in_use:
                continue
            path = self.blob_path(digest)
            try:
                if now - path.stat().st_mtime < grace_s:
                    continue
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(digest)
        return removed

    def _prune_dirs(self, start: Path) -> None:
        """Remove now-empty manifest directories up to (not including) manifests/."""
        d = start
        while d != self.manifests_dir and self.manifests_dir in d.parents:
            try:
                d.rmdir()
            except OSError:
                return
            d = d.parent
