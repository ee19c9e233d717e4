"""`corral gateway`: run the gateway alone, over static backends or ones a launcher registers.

    corral gateway --config config.toml
    corral gateway --backend http://127.0.0.1:11500 --backend http://127.0.0.1:11501

Backends come from `[[gateway.backends]]` and `--backend`, and from records launchers write into
the state store (`[gateway] state = "redis"`). SIGINT/SIGTERM drain: stop accepting, let requests
in progress finish for up to `drain_timeout_s`, then exit. With `--workers N` (or `[gateway]
workers`) above 1, N such gateways share the address, supervised by this process
(gateway_workers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any

from gateway.config import GatewaySettings, gateway_settings_from
from gateway.routing.policy import POLICY_NAMES
from gateway.server import GatewayServer
from gateway.state.store import StateStore, StoreUnreachable, open_checked_store
from launcher.facts.strictconf import ConfigError, load_toml
from launcher.signals import on_stop_signals

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.toml", help="path of config.toml (default: %(default)s)")
    parser.add_argument("--listen", metavar="HOST:PORT", help="address to serve on (overrides [gateway] listen)")
    parser.add_argument("--policy", choices=POLICY_NAMES, help="routing policy (overrides [gateway] policy)")
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help='gateway processes sharing the address (overrides [gateway] workers; above 1 needs state = "redis")',
    )
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="URL",
        help=(
            "an Ollama backend to route to, e.g. http://127.0.0.1:11500 or http://127.0.0.1:11500#num_parallel=4 "
            "(its OLLAMA_NUM_PARALLEL; repeatable; adds to [[gateway.backends]])"
        ),
    )


# Settings a --backend URL may carry after "#", as [[gateway.backends]] keys with integer values.
BACKEND_URL_KEYS: frozenset[str] = frozenset({"num_parallel", "max_loaded_models", "num_ctx"})


def backend_entry(value: str) -> dict[str, Any]:
    """`URL[#key=value&key=value]` as a [[gateway.backends]] table. Errors are left to the config
    decoder where it can say more (the URL); a fragment it cannot read is a ConfigError here."""
    url, _, fragment = value.partition("#")
    entry: dict[str, Any] = {"url": url}
    for item in filter(None, fragment.split("&")):
        key, sep, raw = item.partition("=")
        if not sep or key not in BACKEND_URL_KEYS or not raw.strip().isdigit():
            allowed = ", ".join(f"{k}=N" for k in sorted(BACKEND_URL_KEYS))
            raise ConfigError("--backend", f"cannot read {item!r} in {value!r}; allowed after '#': {allowed}")
        entry[key] = int(raw)
    return entry


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    """The `[gateway]` section with the command line applied on top; ConfigError when invalid.
    A missing config file is fine when --backend names the backends."""
    path = Path(args.config)
    data: dict[str, Any] = {} if args.backend and not path.exists() else load_toml(path)
    section = data.get("gateway", {})
    if isinstance(section, dict):  # anything else is refused by gateway_settings_from below
        section = dict(section)
        if args.listen:
            section["listen"] = args.listen
        if args.policy:
            section["policy"] = args.policy
        if args.workers is not None:
            section["workers"] = args.workers
        if args.backend:
            section["backends"] = [*section.get("backends", []), *(backend_entry(url) for url in args.backend)]
    return gateway_settings_from({**data, "gateway": section})


async def serve(settings: GatewaySettings, store: StateStore, stop: asyncio.Event) -> None:
    """Run until `stop` is set, then drain."""
    async with GatewayServer(settings, store) as server:
        backends = ", ".join(b.url for b in settings.backends) or "registered by launchers"
        print(f"corral gateway: serving {server.url} (policy {settings.policy}; backends: {backends})", file=sys.stderr)
        if not settings.backends and settings.state == "memory":
            # Nothing can register backends in this process's memory: say so instead of 503s later.
            print(
                "corral gateway: warning: no backends; add [[gateway.backends]] or --backend URL "
                '(or share state = "redis" with launchers)',
                file=sys.stderr,
            )
        await stop.wait()
        print("corral gateway: draining", file=sys.stderr)
        await server.drain()


async def open_store_or_say(settings: GatewaySettings, who: str = "corral") -> StateStore | None:
    """The configured state store, checked; None after saying on stderr why it is unreachable."""
    try:
        return await open_checked_store(settings.state, settings.redis_url)
    except StoreUnreachable as e:
        print(f"{who}: {e}", file=sys.stderr)
        return None


async def _main(settings: GatewaySettings) -> int:
    store = await open_store_or_say(settings)
    if store is None:
        return 1
    stop = asyncio.Event()
    try:
        with on_stop_signals(lambda _sig: stop.set()):
            await serve(settings, store, stop)
    except OSError as e:
        print(f"corral: cannot listen on {settings.listen}: {e.strerror or e}", file=sys.stderr)
        return 1
    finally:
        await store.close()
    return 0


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    if settings.workers > 1:
        from launcher.commands.gateway_workers import run_workers  # only a supervisor needs it

        return run_workers(settings, args.verbose)
    return asyncio.run(_main(settings))
