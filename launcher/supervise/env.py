"""The environment each backend process starts with: the whole env contract of `ollama serve`.

One pure function, `backend_env`, so the same code path serves the real `ollama serve` and the
simulated `corral-sim serve` (which honours the same variables), and so a test can check exactly
what a single, a split and a simulated backend receive.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from gateway.record import BackendKind
from launcher.config import LauncherSettings
from launcher.facts.catalog import find_model
from launcher.facts.ollama import host_port
from launcher.facts.strictconf import ConfigError
from launcher.planner.placement import PlannedBackend

# Variables the launcher decides per backend. An inherited value would silently change what the
# plan assumed (a shell with OLLAMA_SCHED_SPREAD=1 exported would spread a single-card backend's
# view, an inherited OLLAMA_HOST would collide ports), so these are always cleared first and then
# set from the plan and config.
MANAGED_VARS: frozenset[str] = frozenset(
    {
        "CUDA_VISIBLE_DEVICES",
        "CUDA_DEVICE_ORDER",
        "OLLAMA_HOST",
        "OLLAMA_MODELS",
        "OLLAMA_NUM_PARALLEL",
        "OLLAMA_KEEP_ALIVE",
        "OLLAMA_MAX_LOADED_MODELS",
        "OLLAMA_MAX_QUEUE",
        "OLLAMA_SCHED_SPREAD",
        "OLLAMA_CONTEXT_LENGTH",
        "OLLAMA_KV_CACHE_TYPE",
        "CORRAL_SIM_RIG",
        "CORRAL_SIM_SPEED",
    }
)

# Corral's own variables a child may see (the simulator's knobs); any other CORRAL_* variable
# that names a key, token, secret or password is the gateway's, never a backend's.
CHILD_CORRAL_VARS: frozenset[str] = frozenset({"CORRAL_SIM_RIG", "CORRAL_SIM_SPEED"})
_SECRET_WORDS: tuple[str, ...] = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASSWD", "CREDENTIAL")


def is_secret_var(name: str, secret_names: frozenset[str] = frozenset()) -> bool:
    """Whether a variable must not reach a child process: one named by `[gateway] api_keys_env` /
    `admin_keys_env` (passed in `secret_names`), or a CORRAL_* variable that holds a key. Keys in
    `/proc/PID/environ` of every `ollama serve` would be readable by anything running as that user
    and end up in crash reports; a backend needs none of them."""
    if name in secret_names:
        return True
    upper = name.upper()
    return upper.startswith("CORRAL_") and upper not in CHILD_CORRAL_VARS and any(w in upper for w in _SECRET_WORDS)


def child_base_env(base_env: Mapping[str, str], secret_names: frozenset[str] = frozenset()) -> dict[str, str]:
    """The launcher's environment minus secrets: what every child (backends, the orphan guard)
    starts from. PATH, HOME, LD_LIBRARY_PATH, proxies, CUDA_*, NVIDIA_*, TMPDIR and the rest stay."""
    return {k: v for k, v in base_env.items() if not is_secret_var(k, secret_names)}


# What makes a backend *that* backend: `[launcher].env` may tune anything else, not these.
IDENTITY_VARS: frozenset[str] = frozenset({"CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "OLLAMA_HOST", "OLLAMA_MODELS"})

# Ollama's documented way to hide every GPU (docs/gpu.mdx: "use an invalid GPU ID (e.g., "-1")").
NO_GPU = "-1"


def check_env_overrides(settings: LauncherSettings) -> None:
    """Refuse `[launcher].env` entries that would undo the plan. Raises ConfigError naming the key."""
    for key in settings.env:
        if key in IDENTITY_VARS:
            raise ConfigError(
                f"launcher.env.{key}",
                "is set by the launcher for each backend from the plan; use [launcher] host/base_port/"
                "models_dir or [[models]].pin instead",
            )
        if not key or "=" in key or "\0" in key:
            raise ConfigError(f"launcher.env.{key}", "is not a valid environment variable name")


def resolve_models_dir(models_dir: str, config_path: str | Path | None) -> Path:
    """The shared model store as an absolute path: `~` and `$VARS` expanded; a relative path is
    taken relative to the config file's directory, so `corral up` finds the same store whatever
    the working directory (a systemd unit, a test in a temp dir)."""
    path = Path(os.path.expandvars(os.path.expanduser(models_dir)))
    if not path.is_absolute():
        base = Path(config_path).resolve().parent if config_path else Path.cwd()
        path = base / path
    return Path(os.path.normpath(path))


def http_url(host: str, port: int) -> str:
    return f"http://{host_port(host, port)}"


def visible_devices(backend: PlannedBackend) -> tuple[str, dict[str, str]]:
    """CUDA_VISIBLE_DEVICES for a backend (strongest card first, as planned), plus what it needs.

    UUIDs are preferred: they name the same card whatever order CUDA enumerates in. Plain indices
    are NVML's (PCI bus) order, while CUDA's default order is fastest-first, so indices come with
    CUDA_DEVICE_ORDER=PCI_BUS_ID to mean the cards the planner meant.
    """
    if not backend.gpu_indices and not backend.gpu_uuids:
        return NO_GPU, {}
    if backend.gpu_uuids and all(backend.gpu_uuids):
        return ",".join(backend.gpu_uuids), {}
    return ",".join(str(i) for i in backend.gpu_indices), {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}


def backend_context_length(backend: PlannedBackend, settings: LauncherSettings) -> int:
    """OLLAMA_CONTEXT_LENGTH for one backend (0: leave Ollama's own default).

    Ollama reloads a model when a request's num_ctx differs from the loaded copy's (sched.go
    needsReload), and a request without num_ctx gets OLLAMA_CONTEXT_LENGTH, capped to the model's
    trained context. Preload loads each model at its planned num_ctx, so the backend's default is
    set to the planned context that the most of its models then match (a smaller trained context
    caps both sides alike), and a plain client request finds the preloaded copy as it is.
    """
    planned_ctx = [m.num_ctx for m in backend.models if m.num_ctx > 0]
    if not planned_ctx:
        return settings.context_length

    def matches(default_ctx: int) -> int:
        hits = 0
        for m in backend.models:
            spec = find_model(m.name)
            trained = spec.context_length if spec is not None else m.num_ctx
            hits += m.num_ctx > 0 and min(default_ctx, trained) == min(m.num_ctx, trained)
        return hits

    return max(sorted(set(planned_ctx), reverse=True), key=matches)


def backend_env(
    backend: PlannedBackend,
    settings: LauncherSettings,
    *,
    models_dir: Path,
    base_env: Mapping[str, str],
    sim_rig: str | None = None,
    sim_speed: float | None = None,
    secret_names: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """The complete environment for one backend process.

    `base_env` is what the launcher inherited (os.environ). Secrets (`secret_names` and CORRAL_*
    keys, see is_secret_var) and the managed variables are dropped from it, the latter then set
    from the plan and config, and `[launcher].env` is applied on top. `sim_rig` (the config file
    path) marks a simulated backend: it gets CORRAL_SIM_RIG, and CORRAL_SIM_SPEED when `sim_speed`
    is given (else an inherited CORRAL_SIM_SPEED passes through, as the config documents).
    """
    env = {k: v for k, v in child_base_env(base_env, secret_names).items() if k not in MANAGED_VARS}
    devices, device_extra = visible_devices(backend)
    env["CUDA_VISIBLE_DEVICES"] = devices
    env.update(device_extra)
    env["OLLAMA_HOST"] = host_port(settings.host, backend.port)
    env["OLLAMA_MODELS"] = str(models_dir)
    env["OLLAMA_NUM_PARALLEL"] = str(backend.num_parallel)
    env["OLLAMA_KEEP_ALIVE"] = settings.keep_alive
    # 0 is Ollama's own "auto" (3 per GPU), so it is passed as is rather than left unset.
    env["OLLAMA_MAX_LOADED_MODELS"] = str(backend.max_loaded_models)
    env["OLLAMA_MAX_QUEUE"] = str(settings.max_queue)
    if backend.kind == BackendKind.SPLIT:
        env["OLLAMA_SCHED_SPREAD"] = "1"
    context_length = backend_context_length(backend, settings)
    if context_length:
        env["OLLAMA_CONTEXT_LENGTH"] = str(context_length)
    if settings.kv_cache_type != "f16":
        env["OLLAMA_KV_CACHE_TYPE"] = settings.kv_cache_type
        # A quantized KV cache needs flash attention; older Ollama releases ignore the cache type
        # without it (OLLAMA_FACTS 2.1). An explicit setting in the inherited env or [launcher].env wins.
        env.setdefault("OLLAMA_FLASH_ATTENTION", "1")
    if sim_rig is not None:
        env["CORRAL_SIM_RIG"] = sim_rig
        if sim_speed is not None:
            env["CORRAL_SIM_SPEED"] = repr(float(sim_speed))
        elif "CORRAL_SIM_SPEED" in base_env:
            env["CORRAL_SIM_SPEED"] = base_env["CORRAL_SIM_SPEED"]
    # check_env_overrides() refuses identity keys at startup; skipping them here keeps this
    # function safe for callers that did not run it.
    env.update({k: v for k, v in settings.env.items() if k not in IDENTITY_VARS})
    return env
