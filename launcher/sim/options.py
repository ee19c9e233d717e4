"""Request options (`"options": {...}`) decoded like api.Options.FromMap, and keep_alive like api.Duration.

The model's own parameters (its params layer) apply first, then the request's. Unknown keys are
ignored (Ollama logs "invalid option provided"); a value of the wrong type is an error that Ollama
surfaces as a 500 with texts such as `option "num_predict" must be of type integer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from launcher.sim.runner import LoadKey, RunnerOptions

DEFAULT_EMBEDDING_NUM_BATCH = 2048

# api.Options fields by JSON name: "int", "float", "bool", "*int", "*bool", "[]string".
_KINDS: dict[str, str] = {
    "num_ctx": "int", "num_batch": "int", "num_gpu": "int", "main_gpu": "*int", "use_mmap": "*bool",
    "num_thread": "int", "draft_num_predict": "int",
    "num_keep": "int", "seed": "int", "num_predict": "int", "top_k": "int", "top_p": "float", "min_p": "float",
    "typical_p": "float", "repeat_last_n": "int", "temperature": "float", "repeat_penalty": "float",
    "presence_penalty": "float", "frequency_penalty": "float", "stop": "[]string",
}  # fmt: skip


class OptionError(Exception):
    """A bad option value; `str()` is Ollama's message."""


@dataclass(frozen=True)
class RequestOptions:
    """Everything a request's options decide: the runner options and the sampling ones."""

    runner: RunnerOptions
    num_ctx_auto: bool
    num_batch_auto: bool
    num_predict: int = -1
    seed: int = -1
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.9
    stop: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def load_key(self) -> LoadKey:
        return LoadKey(self.runner, num_ctx_auto=self.num_ctx_auto, num_batch_auto=self.num_batch_auto)


def _decode(key: str, value: Any) -> Any:
    kind = _KINDS[key]
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if kind in ("int", "*int"):
        if not is_number:
            raise OptionError(f'option "{key}" must be of type integer')
        return int(value)  # Go truncates a float64 toward zero
    if kind == "float":
        if not is_number:
            raise OptionError(f'option "{key}" must be of type float32')
        return float(value)
    if kind in ("bool", "*bool"):
        if not isinstance(value, bool):
            raise OptionError(f'option "{key}" must be of type boolean')
        return value
    if not isinstance(value, list):
        raise OptionError(f'option "{key}" must be of type array')
    if not all(isinstance(item, str) for item in value):
        raise OptionError(f'option "{key}" must be of an array of strings')
    return tuple(value)


def parse_options(
    model_params: Mapping[str, Any],
    request_options: Mapping[str, Any] | None,
    *,
    default_num_ctx: int,
    env_context_length: int,
    embedding: bool = False,
) -> RequestOptions:
    """Merge the model's parameters and the request's options. Raises OptionError."""
    request_options = request_options or {}
    values: dict[str, Any] = {}
    for source in (model_params, request_options):
        for key, value in source.items():
            if key not in _KINDS or value is None:
                continue
            values[key] = _decode(key, value)

    # Ollama tells automatic values by the key's presence in either map (usesAutomaticNumCtx), and
    # clamps an explicit num_ctx below 4 later (getRunner) rather than replacing it with the default.
    def given(key: str) -> bool:
        return key in model_params or key in request_options

    num_ctx_auto = not given("num_ctx") and env_context_length == 0
    num_ctx = values.get("num_ctx", default_num_ctx)
    num_batch_auto = not given("num_batch")
    num_batch = values.get("num_batch", 512)
    if embedding and num_batch_auto:
        num_batch = min(DEFAULT_EMBEDDING_NUM_BATCH, num_ctx) if num_ctx > 0 else DEFAULT_EMBEDDING_NUM_BATCH
        num_batch_auto = False  # Ollama applies it explicitly, so it is compared on reload
    runner = RunnerOptions(
        num_ctx=num_ctx,
        num_batch=num_batch,
        num_gpu=values.get("num_gpu", -1),
        main_gpu=values.get("main_gpu"),
        use_mmap=values.get("use_mmap"),
        num_thread=values.get("num_thread", 0),
        draft_num_predict=values.get("draft_num_predict", 0),
    )
    return RequestOptions(
        runner=runner,
        num_ctx_auto=num_ctx_auto,
        num_batch_auto=num_batch_auto,
        num_predict=values.get("num_predict", -1),
        seed=values.get("seed", -1),
        temperature=values.get("temperature", 0.8),
        top_k=values.get("top_k", 40),
        top_p=values.get("top_p", 0.9),
        stop=values.get("stop", ()),
        extra={k: v for k, v in values.items() if k not in ("num_predict", "seed", "temperature", "stop")},
    )
