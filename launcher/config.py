"""The launcher's sections of config.toml (`[launcher]`, `[[models]]`, `[sim]`) and the whole-file loader."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from gateway.config import GatewaySettings, gateway_settings_from
from launcher.facts.cards import card_names, find_card
from launcher.facts.ollama import env_keep_alive_s
from launcher.facts.strictconf import (
    KNOWN_SECTIONS,
    ConfigError,
    decode,
    decode_list,
    load_toml,
    reject_unknown_sections,
)

KvCacheType = Literal["f16", "q8_0", "q4_0"]


def check_keep_alive(value: str) -> str | None:
    """OLLAMA_KEEP_ALIVE accepts a Go duration or an integer number of seconds (envconfig.KeepAlive)."""
    try:
        env_keep_alive_s(value.strip())
    except ValueError:
        return 'must be a duration like "5m", "24h", "-1" (forever) or "0"'
    return None


def _check_num_ctx(value: int) -> str | None:
    return None if value == 0 or value >= 256 else "must be 0 (Ollama's default) or >= 256"


def _check_card(value: str) -> str | None:
    if find_card(value) is None:
        return f"is not a card in the built-in table ({', '.join(card_names())})"
    return None


def _check_replicas(value: int | str) -> str | None:
    if value == "auto" or (isinstance(value, int) and value >= 1):
        return None
    return 'must be "auto" or an integer >= 1'


@dataclass(frozen=True)
class LauncherSettings:
    # "auto": the real `ollama` when it is on PATH and NVML sees GPUs, else `corral-sim serve`;
    # "sim": always the simulated backend; anything else: the path of an ollama executable.
    ollama_bin: str = "auto"
    models_dir: str = "~/.ollama/models"
    host: str = "127.0.0.1"  # backends listen on loopback only; the gateway is the one door
    base_port: int = field(default=11500, metadata={"min": 1024, "max": 65000})
    num_parallel: int = field(default=4, metadata={"min": 1, "max": 512})
    keep_alive: str = field(default="30m", metadata={"check": check_keep_alive})
    max_loaded_models: int = field(default=0, metadata={"min": 0})
    max_queue: int = field(default=512, metadata={"min": 1})
    context_length: int = field(default=0, metadata={"check": _check_num_ctx})
    kv_cache_type: KvCacheType = "f16"
    # "ollama": per card, what Ollama itself keeps back (minimum + graph); "compute-tier": a
    # conservative reserve by generation (Hopper/Blackwell 6 GB, Ampere/Ada 4 GB, older 2 GB).
    reserve: Literal["ollama", "compute-tier"] = "ollama"
    # Extra reserve per card, in GiB, keyed by GPU index ("0") or UUID.
    card_reserve_gb: dict[str, float] = field(default_factory=dict)
    allow_cpu_offload: bool = True
    require_gpus: bool = False  # fail instead of falling back to the simulated rig
    env: dict[str, str] = field(default_factory=dict)  # extra environment for every backend
    preload: bool = True
    start_timeout_s: float = field(default=60.0, metadata={"duration": True, "min": 1})
    stop_timeout_s: float = field(default=10.0, metadata={"duration": True, "min": 0.1})
    restart_backoff_s: float = field(default=1.0, metadata={"duration": True, "min": 0.01})
    restart_backoff_max_s: float = field(default=60.0, metadata={"duration": True, "min": 0.01})
    stable_after_s: float = field(default=60.0, metadata={"duration": True, "min": 0})
    log_dir: str = ""  # empty: backend logs go to the launcher's stderr, prefixed with the backend id

    def validate(self, path: str) -> None:
        if self.restart_backoff_max_s < self.restart_backoff_s:
            raise ConfigError(f"{path}.restart_backoff_max_s", "must be >= restart_backoff_s")
        for key, gb in self.card_reserve_gb.items():
            if gb < 0:
                raise ConfigError(f"{path}.card_reserve_gb.{key}", f"must be >= 0, got {gb}")


@dataclass(frozen=True)
class ModelEntry:
    name: str = field(metadata={"check": lambda v: None if v.strip() else "must not be empty"})
    num_ctx: int = field(default=0, metadata={"check": _check_num_ctx})  # 0: the launcher's default
    replicas: int | str = field(default="auto", metadata={"check": _check_replicas})
    pin: tuple[int | str, ...] = ()  # GPU indices or UUIDs; wins over the planner
    hot: bool = False  # prefer the fastest cards
    num_parallel: int = field(default=0, metadata={"min": 0, "max": 512})  # 0: [launcher].num_parallel
    keep_alive: str | None = field(
        default=None, metadata={"check": lambda v: None if v is None else check_keep_alive(v)}
    )


@dataclass(frozen=True)
class SimGpu:
    """One simulated card: a name from the built-in table, with optional overrides."""

    name: str = field(metadata={"check": _check_card})
    vram_gb: float | None = field(default=None, metadata={"min": 0.5})
    mem_bw_gbps: float | None = field(default=None, metadata={"min": 1})
    fp16_tflops: float | None = field(default=None, metadata={"min": 0.1})
    uuid: str = ""  # default: GPU-sim-<index>


@dataclass(frozen=True)
class SimSettings:
    gpus: tuple[SimGpu, ...] = ()
    speed: float = field(default=1.0, metadata={"min": 0.001})  # CORRAL_SIM_SPEED wins when set
    load_gbps: float = field(default=3.0, metadata={"min": 0.01})  # store -> VRAM
    download_mbps: float = field(default=1000.0, metadata={"min": 0.1})  # simulated `pull` rate, MB/s
    host_mem_gb: float = field(default=64.0, metadata={"min": 1})
    host_mem_bw_gbps: float = field(default=60.0, metadata={"min": 1})
    # Length of an answer when num_predict does not cut it short (the simulated model's "natural" stop).
    answer_tokens_min: int = field(default=20, metadata={"min": 1})
    answer_tokens_max: int = field(default=60, metadata={"min": 1})

    def validate(self, path: str) -> None:
        if self.answer_tokens_max < self.answer_tokens_min:
            raise ConfigError(f"{path}.answer_tokens_max", "must be >= answer_tokens_min")


@dataclass(frozen=True)
class CorralConfig:
    launcher: LauncherSettings
    models: tuple[ModelEntry, ...]
    gateway: GatewaySettings
    sim: SimSettings
    source: str = ""

    def validate(self) -> None:
        seen: dict[str, int] = {}
        for i, m in enumerate(self.models):
            if m.name in seen:
                raise ConfigError(f"models[{i}].name", f"duplicate model {m.name!r} (also models[{seen[m.name]}])")
            seen[m.name] = i


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    section = data.get(key, {})
    if not isinstance(section, dict):
        raise ConfigError(key, f"must be a table ([{key}])")
    return section


def sim_settings_from(data: dict[str, Any]) -> SimSettings:
    reject_unknown_sections(data, set(KNOWN_SECTIONS))
    return decode(SimSettings, _table(data, "sim"), "sim")


def config_from(data: dict[str, Any], source: str = "") -> CorralConfig:
    """Decode a parsed config file into the whole, validated CorralConfig."""
    reject_unknown_sections(data, set(KNOWN_SECTIONS))
    cfg = CorralConfig(
        launcher=decode(LauncherSettings, _table(data, "launcher"), "launcher"),
        models=decode_list(ModelEntry, data.get("models"), "models"),
        gateway=gateway_settings_from(data),
        sim=sim_settings_from(data),
        source=source,
    )
    cfg.validate()
    return cfg


def load_config(path: str | Path) -> CorralConfig:
    """Read and validate config.toml. Raises ConfigError naming the file and the TOML path."""
    try:
        return config_from(load_toml(path), str(path))
    except ConfigError as e:
        raise (e if e.source else e.in_file(str(path))) from None


def load_sim_settings(path: str | Path) -> SimSettings:
    """Read only the `[sim]` section (what `corral-sim serve` needs from CORRAL_SIM_RIG)."""
    try:
        return sim_settings_from(load_toml(path))
    except ConfigError as e:
        raise (e if e.source else e.in_file(str(path))) from None
