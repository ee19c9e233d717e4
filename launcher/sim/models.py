"""What an installed model is: its manifest's layers read into the facts the simulator serves.

Facts come from the model blob's GGUF header when it has one (a pulled catalog model, a model made
with /api/create from it, or a real GGUF put in the store); otherwise from the catalog, by the name
of the model the layer was taken from or by the model's own name. This mirrors Ollama's GetModel
(server/images.go): the last layer of each media type wins, and the config blob gives the details.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass
from typing import Any

from launcher.facts.catalog import ModelSpec, find_model
from launcher.models.gguf import (
    GGUFArray,
    GGUFError,
    gguf_metadata_for_spec,
    read_gguf,
    read_gguf_metadata,
    spec_from_gguf,
)
from launcher.models.store import (
    MEDIA_TYPE_LICENSE,
    MEDIA_TYPE_MESSAGES,
    MEDIA_TYPE_PARAMS,
    MEDIA_TYPE_PROJECTOR,
    MEDIA_TYPE_SYSTEM,
    MEDIA_TYPE_TEMPLATE,
    InvalidDigest,
    Manifest,
    ModelStore,
)
from launcher.sim import showinfo

DEFAULT_TEMPLATE = "{{ .Prompt }}"  # Ollama's template.DefaultTemplate
# Architectures Ollama runs with one parallel slot whatever OLLAMA_NUM_PARALLEL says (sched.go load).
SINGLE_SLOT_FAMILIES = frozenset(
    {"mllama", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen3next", "lfm2", "lfm2moe"}
    | {"nemotron_h", "nemotron_h_moe", "nemotron_h_omni"}
)


class ModelLoadError(Exception):
    """An installed model whose files cannot be used (Ollama answers 500 with the text)."""


@dataclass(frozen=True)
class InstalledModel:
    """One installed model, as the handlers and the scheduler see it."""

    name: str  # display name, "llama3.1:8b"
    full_name: str  # "registry.ollama.ai/library/llama3.1:8b" (Ollama's Model.Name)
    manifest: Manifest
    spec: ModelSpec
    key: str  # what identifies a loaded copy: the model blob (Ollama keys runners by model path)
    gguf: dict[str, object]  # the header's key/values (empty when the blob is not GGUF)
    config: dict[str, Any]
    template: str
    system: str
    license: tuple[str, ...]
    params: dict[str, Any]
    messages: tuple[dict[str, Any], ...]
    parent_model: str
    projector: bool

    @property
    def embedding_only(self) -> bool:
        return "embedding" in self.capabilities and "completion" not in self.capabilities

    @property
    def capabilities(self) -> tuple[str, ...]:
        """Model.Capabilities(): from the GGUF (pooling -> embedding, else completion), then the template."""
        caps: list[str] = [str(c) for c in self.config.get("capabilities") or []]

        def add(c: str) -> None:
            if c not in caps:
                caps.append(c)

        # Ollama reads these keys through gguf's KeyValue, which prefixes the architecture. An encoder-only
        # architecture whose file lacks pooling_type embeds too (spec.embedding_only says so).
        arch = self.gguf.get("general.architecture")
        pooling = f"{arch}.pooling_type" in self.gguf
        add("embedding" if pooling or self.spec.embedding_only else "completion")
        if f"{arch}.vision.block_count" in self.gguf:
            add("vision")
        if f"{arch}.audio.block_count" in self.gguf:
            add("audio")
        if self.projector:
            add("vision")
        if ".Tools" in self.template:
            add("tools")
        if ".Suffix" in self.template:
            add("insert")
        # thinking.InferTags: a .Thinking between two text tags (ours are <think> ... </think>).
        if ".Thinking" in self.template and "<think>" in self.template and "</think>" in self.template:
            add("thinking")
        if self.config.get("model_family") in ("gptoss", "gpt-oss"):  # modelFamilyCapabilities
            add("thinking")
        return tuple(caps)

    @property
    def harmony(self) -> bool:
        """gpt-oss: Ollama parses its output with the harmony parser (shouldUseHarmony)."""
        return self.spec.family == "gptoss" or self.config.get("model_family") in ("gptoss", "gpt-oss")

    @property
    def stand_in(self) -> bool:
        """The model blob is the simulated registry's metadata-only file (or no GGUF at all)."""
        return "tokenizer.ggml.model" not in self.gguf and "tokenizer.ggml.tokens" not in self.gguf

    def tensors(self, store: ModelStore) -> list[dict[str, Any]]:
        """/api/show `tensors`: the file's tensor infos; synthesised when it has none (the stand-in)."""
        if self.gguf:
            try:
                if infos := read_gguf(store.blob_path(self.key)).tensor_infos:
                    return showinfo.file_tensors(infos)
            except (GGUFError, OSError, InvalidDigest):
                return []
        return showinfo.tensors(self.spec)

    @property
    def supports_context_shift(self) -> bool:
        """sched.go supportsContextShift: every family but deepseek2."""
        families = self.config.get("model_families")
        return self.spec.family != "deepseek2" and not (isinstance(families, list) and "deepseek2" in families)

    @property
    def num_parallel_cap(self) -> int | None:
        """1 when Ollama forces a single slot (embedding models, some architectures), else None."""
        if "completion" not in self.capabilities or self.spec.family in SINGLE_SLOT_FAMILIES:
            return 1
        return None

    def details(self) -> dict[str, Any]:
        """api.ModelDetails from the config blob (field order as Go marshals it)."""
        families = self.config.get("model_families")
        return {
            "parent_model": self.parent_model,
            "format": self.config.get("model_format", "gguf") or "gguf",
            "family": self.config.get("model_family") or self.spec.family,
            "families": families if isinstance(families, list) else None,
            "parameter_size": self.config.get("model_type") or self.spec.parameter_size,
            "quantization_level": self.config.get("file_type") or self.spec.quantization,
        }

    def model_info(self, *, full_metadata: dict[str, object] | None = None) -> dict[str, Any]:
        """/api/show model_info: the GGUF key/values minus general.name and the chat template. A blob
        without a readable GGUF header is described by the metadata its catalog entry would carry.

        Without `full_metadata` (a non-verbose show) every non-empty array is null: Ollama decodes the
        header with maxArraySize 0, so it keeps no array values and marshals them as null. A verbose
        show passes the header read with every array (`read_full_metadata`).
        """
        source = dict(full_metadata or self.gguf or gguf_metadata_for_spec(self.spec))
        if self.stand_in:
            # A real file of this model states these too (showinfo.py); the stand-in blob does not.
            source |= {k: v for k, v in showinfo.extra_model_info(self.spec).items() if k not in source}
            arrays = showinfo.tokenizer_arrays(self.spec)
            source |= arrays if full_metadata is not None else {key: [0] for key in arrays}  # [0]: shown as null
        info: dict[str, Any] = {}
        for key, value in source.items():
            if key in ("general.name", "tokenizer.chat_template"):
                continue
            if full_metadata is None and isinstance(value, GGUFArray | list) and len(value) > 0:
                info[key] = None
            else:
                info[key] = value
        return dict(sorted(info.items()))


def read_full_metadata(store: ModelStore, model: InstalledModel) -> dict[str, object] | None:
    """The model blob's key/values with every array read in full (a verbose show), or None without a
    readable GGUF header."""
    if not model.gguf:
        return None
    if not any(isinstance(value, GGUFArray) for value in model.gguf.values()):
        return model.gguf
    try:
        return read_gguf_metadata(store.blob_path(model.key), max_array_items=sys.maxsize)
    except (GGUFError, OSError):
        return None


def _read_text(store: ModelStore, digest: str) -> str:
    try:
        return store.read_blob(digest).decode("utf-8", errors="replace")
    except (OSError, InvalidDigest):
        return ""


def _read_json(store: ModelStore, digest: str) -> Any:
    with contextlib.suppress(OSError, InvalidDigest, ValueError):
        return json.loads(store.read_blob(digest))
    return None


def _spec_from_catalog(*names: str) -> ModelSpec | None:
    for name in names:
        if name:
            spec = find_model(name)
            if spec is not None:
                return spec
    return None


def load_installed(store: ModelStore, name: str) -> InstalledModel | None:
    """The installed model called `name`, or None when it is not in the store. Raises ModelLoadError."""
    manifest = store.get(name)
    if manifest is None:
        return None
    layer = manifest.model_layer
    if layer is None:
        raise ModelLoadError(f"model '{manifest.name}' has no model layer")
    try:
        blob_path = store.blob_path(layer.digest)
    except InvalidDigest:
        raise ModelLoadError("invalid digest format") from None
    if not blob_path.is_file():
        raise ModelLoadError(f"open {blob_path}: no such file or directory")

    gguf: dict[str, object] = {}
    spec: ModelSpec | None = None
    try:
        gguf = read_gguf_metadata(blob_path)
        spec = spec_from_gguf(gguf, name=manifest.name, file_size_bytes=layer.size)
    except (GGUFError, OSError):
        spec = None
    if spec is None:
        spec = _spec_from_catalog(layer.from_, manifest.name)
        if spec is None:
            raise ModelLoadError(f"unable to load model: {blob_path}")
        gguf = {}

    config = _read_json(store, manifest.config.digest) if manifest.config.digest else None
    template = system = ""
    licenses: list[str] = []
    params: dict[str, Any] = {}
    messages: tuple[dict[str, Any], ...] = ()
    projector = False
    has_template = False
    for entry in manifest.layers:
        if entry.media_type == MEDIA_TYPE_TEMPLATE:
            template, has_template = _read_text(store, entry.digest), True
        elif entry.media_type == MEDIA_TYPE_SYSTEM:
            system = _read_text(store, entry.digest)
        elif entry.media_type == MEDIA_TYPE_LICENSE:
            licenses.append(_read_text(store, entry.digest))
        elif entry.media_type == MEDIA_TYPE_PARAMS:
            loaded = _read_json(store, entry.digest)
            params = loaded if isinstance(loaded, dict) else {}
        elif entry.media_type == MEDIA_TYPE_MESSAGES:
            loaded = _read_json(store, entry.digest)
            messages = tuple(m for m in loaded if isinstance(m, dict)) if isinstance(loaded, list) else ()
        elif entry.media_type == MEDIA_TYPE_PROJECTOR:
            projector = True
    stored = manifest.model_name
    return InstalledModel(
        name=manifest.name,
        full_name=f"{stored.host}/{stored.namespace}/{stored.model}:{stored.tag}",
        manifest=manifest,
        spec=spec,
        key=layer.digest,
        gguf=gguf,
        config=config if isinstance(config, dict) else {},
        template=template if has_template else DEFAULT_TEMPLATE,
        system=system,
        license=tuple(licenses),
        params=params,
        messages=messages,
        parent_model=layer.from_,
        projector=projector,
    )
