"""API keys: who may use the gateway, and who may manage the fleet.

Keys come from a file (one per line, `#` comments and blank lines ignored) and from an environment
variable (comma separated). Clients send `Authorization: Bearer <key>`, which is what the OpenAI SDK
sends and what ollama-python sends when OLLAMA_API_KEY is set. Keys are compared in constant time
against every configured key, and never logged.

With no keys at all the gateway is open, so it refuses to listen anywhere but loopback. When admin
keys exist, management routes (pull, push, create, copy, delete, blobs, /metrics, /api/corral/*)
need one of them; admin keys are also valid everywhere else.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from gateway.api.errors import error_for
from gateway.config import GatewaySettings
from launcher.facts.strictconf import ConfigError

# Paths that stay open even when keys are configured: liveness probes hit `/` (Ollama's own
# "Ollama is running"), and readiness probes /api/corral/ready: neither reveals anything; nor do
# the fleet page's static files (the data they show comes from /api/corral/status, which needs
# the admin key).
PUBLIC_PATHS: frozenset[str] = frozenset({"/", "/corral", "/api/corral/ready"})
PUBLIC_PREFIXES: tuple[str, ...] = ("/corral/",)

# Routes that change the fleet or expose its internals.
ADMIN_PATHS: frozenset[str] = frozenset(
    {"/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/metrics"}
)
ADMIN_PREFIXES: tuple[str, ...] = ("/api/blobs/", "/api/corral/")
# Under the admin prefix but for every client key: what a batch client needs to size itself.
CLIENT_PATHS: frozenset[str] = frozenset({"/api/corral/capacity"})


@dataclass(frozen=True)
class ApiKeys:
    """The configured keys. Empty tuples mean "not configured"."""

    api: tuple[str, ...] = ()
    admin: tuple[str, ...] = ()
    batch: tuple[str, ...] = ()  # keys (also valid as api keys) whose requests go to the batch lane

    def is_batch(self, token: str) -> bool:
        return bool(token) and bool(self.batch) and _matches(token, self.batch)

    @property
    def enabled(self) -> bool:
        return bool(self.api or self.admin)


def read_keys_file(path: str, toml_path: str) -> list[str]:
    """Keys in a file: one per line; blank lines and `#` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(toml_path, f"cannot read {path}: {e.strerror}") from None
    keys = []
    for line in text.splitlines():
        key = line.split("#", 1)[0].strip()
        if key:
            keys.append(key)
    return keys


def _env_keys(environ: Mapping[str, str], name: str) -> list[str]:
    if not name:
        return []
    return [k.strip() for k in environ.get(name, "").split(",") if k.strip()]


def load_keys(settings: GatewaySettings, environ: Mapping[str, str]) -> ApiKeys:
    """Read the keys the settings point at (files and environment). Raises ConfigError for an
    unreadable keys file."""
    api = _env_keys(environ, settings.api_keys_env)
    if settings.api_keys_file:
        api += read_keys_file(settings.api_keys_file, "gateway.api_keys_file")
    admin = _env_keys(environ, settings.admin_keys_env)
    if settings.admin_keys_file:
        admin += read_keys_file(settings.admin_keys_file, "gateway.admin_keys_file")
    batch = read_keys_file(settings.batch_keys_file, "gateway.batch_keys_file") if settings.batch_keys_file else []
    # A batch key is a user key too: listing it in batch_keys_file is enough to let it in.
    api += batch
    return ApiKeys(api=tuple(dict.fromkeys(api)), admin=tuple(dict.fromkeys(admin)), batch=tuple(dict.fromkeys(batch)))


def is_loopback_host(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen_allowed(host: str, keys: ApiKeys) -> None:
    """Refuse an open gateway on a reachable address. Raises ConfigError."""
    if not keys.enabled and not is_loopback_host(host):
        raise ConfigError(
            "gateway.listen",
            f"refusing to listen on non-loopback address {host!r} without API keys "
            "(set gateway.api_keys_file or the variable named by gateway.api_keys_env)",
        )


def _matches(candidate: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key without stopping early, so timing tells nothing about which
    # key (or how many) exist.
    given = candidate.encode()
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key.encode())
    return found


def bearer_token(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def needs_admin(path: str) -> bool:
    if path in CLIENT_PATHS:
        return False
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)


def auth_refusal(keys: ApiKeys, request: web.Request) -> web.Response | None:
    """401 without a valid key, 403 for a non-admin key on a management route; None: go on."""
    if not keys.enabled or request.path in PUBLIC_PATHS or request.path.startswith(PUBLIC_PREFIXES):
        return None
    if request.match_info.http_exception is not None:
        return None  # unknown path or wrong method: 404/405 like Ollama
    token = bearer_token(request)
    is_admin = bool(token) and _matches(token, keys.admin)
    is_user = is_admin or (bool(token) and _matches(token, keys.api))
    if not is_user:
        return error_for(
            request, 401, "unauthorized: missing or invalid API key", headers={"WWW-Authenticate": "Bearer"}
        )
    if keys.admin and needs_admin(request.path) and not is_admin:
        return error_for(request, 403, "forbidden: this route needs an admin key")
    return None
