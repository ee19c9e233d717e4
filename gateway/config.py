"""The `[gateway]` section of config.toml: frozen dataclasses, decoded strictly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from launcher.facts.strictconf import KNOWN_SECTIONS, ConfigError, decode, load_toml, reject_unknown_sections

# More gateway processes than this on one host is a typo rather than a plan (each one polls every
# backend and holds its own connections to them).
MAX_WORKERS = 64

Policy = Literal["residency", "round-robin", "least-busy", "random"]


def _check_url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    try:
        _ = parts.port
    except ValueError:
        return "has an invalid port"
    return None


def _check_redis_url(value: str) -> str | None:
    # The schemes redis-py's from_url accepts; anything else would fail only when the gateway starts.
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        return "must be a redis://, rediss:// or unix:// URL"
    return None


def _check_listen(value: str) -> str | None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return 'must be "host:port", e.g. "127.0.0.1:11434"'
    return None


@dataclass(frozen=True)
class StaticBackend:
    """A backend named in config (`[[gateway.backends]]`) rather than registered by the launcher."""

    url: str = field(metadata={"check": _check_url})
    id: str = ""  # default: derived from the URL's host and port
    gpus: tuple[str, ...] = ()  # GPU names or UUIDs, for display and metrics
    num_parallel: int = field(default=1, metadata={"min": 1})
    kind: Literal["single", "split", "cpu"] = "single"
    max_loaded_models: int = field(default=0, metadata={"min": 0})
    vram_gb: float = field(default=0.0, metadata={"min": 0})
    speed: float = field(default=1.0, metadata={"min": 0.001})
    # The backend's OLLAMA_CONTEXT_LENGTH, when set: the context of requests without num_ctx.
    num_ctx: int = field(default=0, metadata={"min": 0})
    # Backends naming the same store share one OLLAMA_MODELS: pulls and deletes happen once.
    store_id: str = ""

    @property
    def backend_id(self) -> str:
        if self.id:
            return self.id
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = field(default="127.0.0.1:11434", metadata={"check": _check_listen})
    policy: Policy = "residency"
    # Requests that no backend can take now wait at the gateway, per model, up to this many.
    queue_size: int = field(default=256, metadata={"min": 0})
    queue_timeout_s: float = field(default=300.0, metadata={"duration": True, "min": 0})
    # Residency policy: when even the best backend's expected wait for a slot is longer than this,
    # the request waits at the gateway (where it can still go wherever a slot frees first).
    max_wait_s: float = field(default=30.0, metadata={"duration": True, "min": 0})
    # Residency policy: may the router load further copies of a model beyond the planned ones, on
    # spare or idle capacity, when that gives the first token sooner? False keeps every model to its
    # planned copies (models planned nowhere still load where they fit).
    spill: bool = True
    # A request whose num_ctx is above the context a copy was loaded with: "fit" serves it there at
    # the loaded context when its prompt plus expected answer fits (the reply says so in
    # X-Corral-Num-Ctx), "honor" sends it as asked (Ollama reloads), "reject" answers 400.
    context_policy: Literal["fit", "honor", "reject"] = "fit"
    # API keys whose requests default to the batch lane and may not raise themselves to interactive.
    batch_keys_file: str = ""
    max_body_bytes: int = field(default=32 * 1024 * 1024, metadata={"min": 1024})
    retries: int = field(default=2, metadata={"min": 0, "max": 10})
    connect_timeout_s: float = field(default=5.0, metadata={"duration": True, "min": 0.1})
    # Upstream first byte: the router's expected time (load + queue + prefill, plus the decode of a
    # non-streamed answer) times this factor, never less than the floor. A backend that stays
    # silent past it is treated as hung: the request goes elsewhere (nothing was sent yet).
    first_byte_timeout_factor: float = field(default=4.0, metadata={"min": 1})
    first_byte_timeout_floor_s: float = field(default=120.0, metadata={"duration": True, "min": 0.1})
    # Upstream silence between two chunks once a reply has started; the stream then ends with an
    # error line.
    stream_idle_timeout_s: float = field(default=120.0, metadata={"duration": True, "min": 0.1})
    health_interval_s: float = field(default=5.0, metadata={"duration": True, "min": 0.1})
    health_timeout_s: float = field(default=2.0, metadata={"duration": True, "min": 0.1})
    poll_interval_s: float = field(default=1.0, metadata={"duration": True, "min": 0.05})
    eject_after_failures: int = field(default=2, metadata={"min": 1})
    eject_for_s: float = field(default=10.0, metadata={"duration": True, "min": 0.1})
    cold_load_threshold_s: float = field(default=1.0, metadata={"duration": True, "min": 0})
    # On shutdown: stop accepting, then let requests in progress finish for up to this long.
    drain_timeout_s: float = field(default=30.0, metadata={"duration": True, "min": 0})
    # Client side, like nginx's client_header_timeout / client_body_timeout / keepalive_timeout:
    # the request line and headers must arrive within header_read_timeout_s of the first byte (or
    # of the connection), each read of a body within body_read_timeout_s of the last one, and an
    # idle kept-alive connection is closed after keepalive_timeout_s.
    header_read_timeout_s: float = field(default=10.0, metadata={"duration": True, "min": 0.05})
    body_read_timeout_s: float = field(default=60.0, metadata={"duration": True, "min": 0.05})
    keepalive_timeout_s: float = field(default=75.0, metadata={"duration": True, "min": 0.05})
    # Open client connections beyond this get 503 and are closed.
    max_connections: int = field(default=4096, metadata={"min": 1})
    # Host headers accepted besides Ollama's own list when listening on loopback (DNS-rebinding
    # guard); "*" accepts any.
    allowed_hosts: tuple[str, ...] = ()
    # One line per request on the `corral.access` logger (off: it costs a few percent at high rates).
    access_log: bool = False
    api_keys_file: str = ""
    api_keys_env: str = "CORRAL_API_KEYS"
    admin_keys_file: str = ""
    admin_keys_env: str = "CORRAL_ADMIN_KEYS"
    # Browser origins allowed besides Ollama's own list (localhost, app://, file://, ...); "*" = any.
    cors_origins: tuple[str, ...] = ()
    state: Literal["memory", "redis"] = "memory"
    # `corral gateway` only: gateway processes sharing the listen address (SO_REUSEPORT). Above 1
    # they must share their routing state, so it needs state = "redis".
    workers: int = field(default=1, metadata={"min": 1, "max": MAX_WORKERS})
    redis_url: str = field(default="redis://127.0.0.1:6379/0", metadata={"check": _check_redis_url})
    # HTTPS on the gateway's own listener: PEM certificate chain and private key (both or neither).
    # A gateway on a reachable address carries API keys in every request; the alternative is a TLS
    # front (nginx, a cloud load balancer, an ingress) in front of a loopback-bound gateway.
    tls_cert: str = ""
    tls_key: str = ""
    backends: tuple[StaticBackend, ...] = ()

    def validate(self, path: str) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            missing = "tls_key" if self.tls_cert else "tls_cert"
            raise ConfigError(f"{path}.{missing}", "tls_cert and tls_key must be set together (PEM files)")
        if self.workers > 1 and self.state != "redis":
            raise ConfigError(
                f"{path}.workers",
                f'workers = {self.workers} needs state = "redis": each worker is its own process, and '
                "in-memory state (backend records, in-flight counts) cannot be shared between processes",
            )
        ids = [b.backend_id for b in self.backends]
        for i, backend_id in enumerate(ids):
            if backend_id in ids[:i]:
                raise ConfigError(f"{path}.backends[{i}].id", f"duplicate backend id {backend_id!r}")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    @property
    def listen_host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])


def gateway_settings_from(data: dict[str, Any]) -> GatewaySettings:
    """Decode `[gateway]` from an already parsed config file."""
    reject_unknown_sections(data, set(KNOWN_SECTIONS))
    section = data.get("gateway", {})
    if not isinstance(section, dict):
        raise ConfigError("gateway", "must be a table ([gateway])")
    return decode(GatewaySettings, section, "gateway")


def load_gateway_settings(path: str | Path) -> GatewaySettings:
    """Read config.toml and decode its `[gateway]` section; errors name the file and the TOML path."""
    try:
        return gateway_settings_from(load_toml(path))
    except ConfigError as e:
        raise e if e.source else e.in_file(str(path)) from None
