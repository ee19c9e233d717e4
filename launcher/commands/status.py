"""`corral status`: the fleet at a glance, like nvidia-smi for a rig of Ollama backends.

Asks the running gateway (`GET /api/corral/status`) and prints the GPUs with VRAM used / free,
each backend with its state, uptime, restarts, resident models, in-flight and queued requests.
`--json` prints the gateway's answer unchanged, for scripts. The gateway's address comes from
--url, else the config's [gateway].listen; an API key from --api-key or CORRAL_API_KEY.
A gateway that is not running is one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from gateway.api.status_doc import BackendDoc, StatusDoc
from launcher.config import load_config
from launcher.facts.ollama import host_port

DEFAULT_URL = "http://127.0.0.1:11434"
STATUS_PATH = "/api/corral/status"
TIMEOUT_S = 10.0
GIB = 1024**3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_gateway_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the gateway's JSON answer")


def add_gateway_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the gateway is and how to get in (shared with `corral top`)."""
    parser.add_argument("--config", default="config.toml", help="path of config.toml, for [gateway].listen")
    parser.add_argument("--url", default=None, help=f"the gateway's URL (default: from the config, else {DEFAULT_URL})")
    parser.add_argument("--api-key", default=None, help="API key, if the gateway needs one (default: $CORRAL_API_KEY)")


def gateway_url(args: argparse.Namespace) -> str:
    """--url, else the config's [gateway].listen (a wildcard address means this machine)."""
    if args.url:
        url = str(args.url)
        return (url if "://" in url else f"http://{url}").rstrip("/")
    if not Path(args.config).exists() and args.config == "config.toml":
        return DEFAULT_URL  # no config here: assume the default listen address
    settings = load_config(args.config).gateway
    host = settings.listen_host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    scheme = "https" if settings.tls else "http"
    return f"{scheme}://{host_port(host, settings.listen_port)}"


class StatusError(Exception):
    """The one line to print when the status cannot be fetched."""


def fetch_status(url: str, api_key: str | None, timeout_s: float = TIMEOUT_S) -> StatusDoc:
    try:
        request = urllib.request.Request(url + STATUS_PATH, headers={"Accept": "application/json"})
    except ValueError as e:
        raise StatusError(f"{url} is not a valid URL ({e})") from None
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    # The gateway is usually on loopback: an HTTP(S)_PROXY from the environment must not catch it.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout_s) as resp:
            raw = resp.read()
    except urllib.error.HTTPError as e:
        detail = _error_text(e)
        if e.code in (401, 403):
            raise StatusError(
                f"the gateway at {url} refused the request ({e.code}: {detail}); pass --api-key or set CORRAL_API_KEY"
            ) from None
        if e.code == 404:
            raise StatusError(f"{url} answered 404 for {STATUS_PATH}: is it a corral gateway?") from None
        raise StatusError(f"the gateway at {url} answered {e.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise StatusError(f"no corral gateway at {url} ({reason}); is `corral up` running?") from None
    except http.client.InvalidURL as e:
        raise StatusError(f"{url} is not a valid URL ({e})") from None
    except http.client.HTTPException as e:  # something listens there, but it does not speak HTTP
        raise StatusError(f"{url} did not answer HTTP ({e!r}): is it a corral gateway?") from None
    try:
        body = json.loads(raw)
    except ValueError:
        raise StatusError(f"{url}{STATUS_PATH} did not answer JSON: is it a corral gateway?") from None
    if not isinstance(body, dict):
        raise StatusError(f"{url}{STATUS_PATH} answered an unexpected document")
    # Trusted as the gateway's StatusDoc; readers still use .get(): an older gateway may lack keys.
    return cast(StatusDoc, body)


def _error_text(e: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(e.read())
    except (ValueError, OSError):
        return e.reason or "error"
    return str(body.get("error", e.reason)) if isinstance(body, dict) else str(e.reason)


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def duration(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    lines = ["  " + "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    for row in rows:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return lines


def _counts(per_model: Any) -> str:
    if not isinstance(per_model, dict) or not per_model:
        return "0"
    total = sum(int(v) for v in per_model.values())
    return f"{total} ({', '.join(f'{m} {n}' for m, n in sorted(per_model.items()))})"


def _resident_rows(backend: BackendDoc, now: float) -> list[list[str]]:
    rows = []
    for model in backend.get("resident") or []:
        expires = model.get("expires_at")
        if isinstance(expires, int | float) and expires > 0:
            left = duration(expires - now) if expires - now < 10 * 365 * 86400 else "never"
        else:
            left = "-"
        rows.append(
            [
                str(backend.get("id", "?")),
                str(model.get("name", "?")),
                f"{_gib(float(model.get('size_vram_bytes') or 0))} GiB",
                str(model.get("context_length") or "-"),
                left,
            ]
        )
    return rows


def render(status: StatusDoc, url: str, now: float | None = None) -> str:
    """The human table for one status document."""
    now = time.time() if now is None else now
    gateway = status.get("gateway") or {}
    lines = [
        f"gateway {url}  corral {gateway.get('version', '?')}  policy {gateway.get('policy', '?')}  "
        f"up {duration(float(gateway.get('uptime_s') or 0))}  active requests {gateway.get('active_requests', 0)}  "
        f"queued {_counts(gateway.get('queue_depths'))}",
        "",
    ]
    gpus = status.get("gpus") or {}
    gpu_rows = []
    if isinstance(gpus, dict) and "error" not in gpus:
        for host, cards in sorted(gpus.items()):
            for card in cards:
                total = float(card.get("memory_total_bytes") or 0)
                used = float(card.get("memory_used_bytes") or 0)
                free = float(card.get("memory_free_bytes", total - used))
                pct = f"{100 * used / total:.0f}%" if total else "-"
                gpu_rows.append(
                    [
                        str(host),
                        str(card.get("index", "?")),
                        str(card.get("name", "?")),
                        str(card.get("backend") or "-"),
                        f"{_gib(used)} / {_gib(total)} GiB",
                        pct,
                        f"{_gib(free)} GiB",
                    ]
                )
    lines.append("GPUs")
    if gpu_rows:
        lines += _table(["HOST", "IDX", "NAME", "BACKEND", "VRAM USED / TOTAL", "USE", "FREE"], gpu_rows)
    else:
        lines.append(
            f"  (none reported{': ' + str(gpus['error']) if isinstance(gpus, dict) and 'error' in gpus else ''})"
        )
    lines.append("")
    backend_rows = []
    resident_rows: list[list[str]] = []
    problems = []
    for backend in status.get("backends") or []:
        state = str(backend.get("state", "?"))
        if state == "ready" and backend.get("healthy") is False:
            state = "unhealthy"
        started = float(backend.get("started_at") or 0)
        backend_rows.append(
            [
                str(backend.get("id", "?")),
                state,
                duration(now - started) if started and state in ("ready", "unhealthy") else "-",
                str(backend.get("restarts", 0)),
                " + ".join(backend.get("gpu_names") or []) or "CPU",
                str(backend.get("url", "")),
                _counts(backend.get("in_flight")),
                _counts(backend.get("queued")),
            ]
        )
        resident_rows += _resident_rows(backend, now)
        error = backend.get("last_error") or backend.get("health_error")
        if error and state != "ready":
            problems.append(f"  {backend.get('id', '?')}: {error}")
    lines.append("Backends")
    if backend_rows:
        headers = ["ID", "STATE", "UPTIME", "RESTARTS", "GPUS", "URL", "IN-FLIGHT", "QUEUED"]
        lines += _table(headers, backend_rows)
    else:
        lines.append("  (none)")
    lines += ["", "Resident models"]
    if resident_rows:
        lines += _table(["BACKEND", "MODEL", "VRAM", "CONTEXT", "EXPIRES IN"], resident_rows)
    else:
        lines.append("  (none)")
    if problems:
        lines += ["", "Problems", *problems]
    warnings = status.get("warnings") or []
    if warnings:
        lines += ["", "Warnings", *(f"  {w.get('message', '?')}" for w in warnings)]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    url = gateway_url(args)
    api_key = args.api_key or os.environ.get("CORRAL_API_KEY") or None
    try:
        status = fetch_status(url, api_key)
    except StatusError as e:
        print(f"corral status: {e}", file=sys.stderr)
        return 1
    if args.json:
        json.dump(status, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        print(render(status, url))
    return 0
