"""The environment contract of `ollama serve`, read the way Ollama's envconfig reads it.

`corral-sim serve` is started with exactly the environment the launcher gives the real binary, so
every variable here is parsed like `envconfig/config.go` parses it (values trimmed of spaces and
quotes, `OLLAMA_HOST` split like `envconfig.Host()`, durations as Go durations or integer seconds).
Where Ollama would silently fall back to a default on a bad value, the simulator refuses to start
instead (`EnvError`: one line, exit status 2), because a wrong value there is a launcher bug worth
seeing. The simulator's own variables are `CORRAL_SIM_RIG` (the TOML file whose `[sim]` section
lists the cards) and `CORRAL_SIM_SPEED`.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from launcher.config import SimSettings, load_sim_settings
from launcher.facts.hosts import split_host_port
from launcher.facts.ollama import (
    DEFAULT_KEEP_ALIVE_S,
    default_max_loaded_models,
    env_keep_alive_s,
    env_uint,
    env_var,
    vram_default_num_ctx,
)
from launcher.facts.perf import KV_BYTES_PER_ELEMENT
from launcher.facts.strictconf import ConfigError
from launcher.gpus.discovery import GpuInfo, simulated_inventory

GIB = 1024**3


class EnvError(Exception):
    """An environment variable the simulator cannot use. `str()` is the line to print."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


@dataclass(frozen=True)
class ServeSettings:
    """Everything `corral-sim serve` takes from its environment."""

    scheme: str
    host: str  # bind address
    port: int
    models_dir: Path
    cards: tuple[GpuInfo, ...]  # the visible cards, in CUDA_VISIBLE_DEVICES order
    num_parallel: int
    keep_alive_s: float  # math.inf = forever
    max_loaded_models: int  # 0 = automatic (3 per visible card, 3 on CPU)
    max_queue: int
    sched_spread: bool
    context_length: int  # 0 = by VRAM tier
    kv_cache_type: str
    gpu_overhead_bytes: int
    noprune: bool
    origins: tuple[str, ...]
    speed: float
    rig: SimSettings
    rig_path: str

    @property
    def max_runners(self) -> int:
        """OLLAMA_MAX_LOADED_MODELS, or the automatic 3 x visible cards (3 on CPU)."""
        return self.max_loaded_models or default_max_loaded_models(len(self.cards))

    @property
    def default_num_ctx(self) -> int:
        """The context used when nothing asks for one (routes.go Serve: by total VRAM, HEAD)."""
        if self.context_length:
            return self.context_length
        total = sum(max(c.memory_total_bytes - self.gpu_overhead_bytes, 0) for c in self.cards)
        return vram_default_num_ctx(total)

    @property
    def host_mem_bytes(self) -> int:
        return int(self.rig.host_mem_gb * GIB)


def parse_ollama_host(value: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) exactly as envconfig.Host() splits OLLAMA_HOST.

    A bare host gets port 11434; `http://x` port 80 and `https://x` port 443; "ollama.com" alone is
    https on 443. Raises ValueError where Ollama would warn and fall back (a bad port).
    """
    default_port = "11434"
    s = value.strip()
    scheme, sep, hostport = s.partition("://")
    if not sep:
        scheme, hostport = "http", s
        if s == "ollama.com":
            scheme, hostport = "https", "ollama.com:443"
    elif scheme == "http":
        default_port = "80"
    elif scheme == "https":
        default_port = "443"
    hostport, _, path = hostport.partition("/")
    host, port = split_host_port(hostport)
    if host is None:
        host, port = "127.0.0.1", default_port
        bare = hostport.strip("[]")
        try:
            host = str(ipaddress.ip_address(bare))
        except ValueError:
            if hostport:
                host = hostport
    try:
        number = int(port or "")
    except ValueError:
        raise ValueError(f"invalid port {port!r}") from None
    if not 0 <= number <= 65535:
        raise ValueError(f"invalid port {port!r}")
    return scheme, host, number, path




def _uint(environ: Mapping[str, str], key: str, default: int) -> int:
    try:
        value = env_uint(environ, key)
    except ValueError:
        raise EnvError(key, f"must be a non-negative integer, got {env_var(environ, key)!r}") from None
    return default if value is None else value


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _bool(environ: Mapping[str, str], key: str) -> bool:
    raw = env_var(environ, key)
    if not raw:
        return False
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise EnvError(key, f"must be a boolean (1/0/true/false), got {raw!r}")


def visible_cards(value: str | None, rig: list[GpuInfo]) -> tuple[GpuInfo, ...]:
    """The rig's cards a CUDA_VISIBLE_DEVICES value exposes, in its order. Raises ValueError.

    Unset: all cards. "" or "-1": none (CPU only). Otherwise a comma list of indices into the rig or
    UUIDs (a unique prefix is enough, as CUDA accepts).
    """
    if value is None:
        return tuple(rig)
    text = value.strip().strip("\"'")
    if text in ("", "-1"):
        return ()
    chosen: list[GpuInfo] = []
    for raw in text.split(","):
        item = raw.strip()
        if item.isdigit():
            index = int(item)
            if index >= len(rig):
                raise ValueError(f"no card {index} in the rig (it has {len(rig)})")
            card = rig[index]
        else:
            matches = [c for c in rig if c.uuid == item] or [c for c in rig if c.uuid.startswith(item)]
            if len(matches) != 1:
                known = ", ".join(c.uuid for c in rig) or "none"
                raise ValueError(f"{item!r} matches {len(matches)} cards (rig UUIDs: {known})")
            card = matches[0]
        if card in chosen:
            raise ValueError(f"card {item!r} is listed twice")
        chosen.append(card)
    return tuple(chosen)


def load_serve_settings(environ: Mapping[str, str], *, cwd: Path | None = None) -> ServeSettings:
    """Read `ollama serve`'s environment plus the simulator's own. Raises EnvError."""
    base = cwd or Path.cwd()
    try:
        scheme, host, port, _path = parse_ollama_host(env_var(environ, "OLLAMA_HOST"))
    except ValueError as e:
        raise EnvError("OLLAMA_HOST", str(e)) from None

    rig_path = env_var(environ, "CORRAL_SIM_RIG") or "config.toml"
    resolved_rig = Path(rig_path).expanduser()
    if not resolved_rig.is_absolute():
        resolved_rig = base / resolved_rig
    try:
        rig = load_sim_settings(resolved_rig)
    except ConfigError as e:
        raise EnvError("CORRAL_SIM_RIG", str(e)) from None
    inventory = simulated_inventory(rig.gpus)
    cuda = environ.get("CUDA_VISIBLE_DEVICES")
    try:
        cards = visible_cards(cuda, inventory)
    except ValueError as e:
        raise EnvError("CUDA_VISIBLE_DEVICES", str(e)) from None

    models = env_var(environ, "OLLAMA_MODELS")
    models_dir = Path(models).expanduser() if models else Path.home() / ".ollama" / "models"
    if not models_dir.is_absolute():
        models_dir = base / models_dir

    keep_alive_raw = env_var(environ, "OLLAMA_KEEP_ALIVE")
    try:
        keep_alive_s = env_keep_alive_s(keep_alive_raw) if keep_alive_raw else DEFAULT_KEEP_ALIVE_S
    except ValueError:
        message = f'must be a duration like "5m", "-1" or "0", got {keep_alive_raw!r}'
        raise EnvError("OLLAMA_KEEP_ALIVE", message) from None

    kv_type = env_var(environ, "OLLAMA_KV_CACHE_TYPE") or "f16"
    if kv_type not in KV_BYTES_PER_ELEMENT:
        raise EnvError("OLLAMA_KV_CACHE_TYPE", f"must be one of {', '.join(KV_BYTES_PER_ELEMENT)}, got {kv_type!r}")

    speed_raw = env_var(environ, "CORRAL_SIM_SPEED")
    speed = rig.speed
    if speed_raw:
        try:
            speed = float(speed_raw)
        except ValueError:
            raise EnvError("CORRAL_SIM_SPEED", f"must be a number > 0, got {speed_raw!r}") from None
        if not speed > 0 or math.isinf(speed):
            raise EnvError("CORRAL_SIM_SPEED", f"must be a number > 0, got {speed_raw!r}")

    origins_raw = env_var(environ, "OLLAMA_ORIGINS")
    return ServeSettings(
        scheme=scheme,
        host=host,
        port=port,
        models_dir=models_dir,
        cards=cards,
        num_parallel=max(_uint(environ, "OLLAMA_NUM_PARALLEL", 1), 1),
        keep_alive_s=keep_alive_s,
        max_loaded_models=_uint(environ, "OLLAMA_MAX_LOADED_MODELS", 0),
        max_queue=_uint(environ, "OLLAMA_MAX_QUEUE", 512),
        sched_spread=_bool(environ, "OLLAMA_SCHED_SPREAD"),
        context_length=_uint(environ, "OLLAMA_CONTEXT_LENGTH", 0),
        kv_cache_type=kv_type,
        gpu_overhead_bytes=_uint(environ, "OLLAMA_GPU_OVERHEAD", 0),
        noprune=_bool(environ, "OLLAMA_NOPRUNE"),
        origins=tuple(o for o in origins_raw.split(",") if o) if origins_raw else (),
        speed=speed,
        rig=rig,
        rig_path=str(resolved_rig),
    )
