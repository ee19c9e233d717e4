"""`corral up --config FILE`: the whole rig in one command.

load config -> resolve the rig (real GPUs + ollama, or the simulated rig) -> plan -> start every
backend (in parallel, health-gated) -> preload the planned models -> serve the gateway in this
process over the same state store the supervisor publishes to -> run until SIGTERM/SIGINT ->
drain the gateway (up to [gateway] drain_timeout_s) -> stop every backend (SIGTERM to its group, SIGKILL
after stop_timeout_s) -> exit 0.

Exit status: 0 after a signal-initiated shutdown (also during startup), 1 when the plan has errors,
a backend cannot start, the gateway cannot listen, the shared state store does not answer, or (with
--strict) a model cannot be preloaded; 2 for a config error (one line, from launcher.commands.cli). What can
be checked before anything starts is checked first (the gateway's address, the store). Progress
goes to stdout; logs to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp

from gateway.api.auth import check_listen_allowed, load_keys
from gateway.config import GatewaySettings
from gateway.state.store import StateStore, StoreUnreachable, open_checked_store
from gateway.tls import server_ssl_context
from launcher.commands.rig import Rig, model_specs, resolve_rig
from launcher.config import CorralConfig, load_config
from launcher.facts.catalog import normalize_name
from launcher.facts.strictconf import ConfigError
from launcher.gpus.publish import GpuPublisher, Refresh, nvml_refresh, sim_refresh
from launcher.planner.placement import Plan
from launcher.planner.plan import plan as make_plan
from launcher.signals import on_stop_signals
from launcher.supervise.childproc import SpawnError, port_in_use
from launcher.supervise.env import backend_env, check_env_overrides, resolve_models_dir
from launcher.supervise.preload import PreloadTarget, ProgressPrinter, preload
from launcher.supervise.supervisor import BackendLaunch, BackendProcess, Supervisor, Timing

if TYPE_CHECKING:
    from gateway.server import GatewayServer

T = TypeVar("T")

# Records in a shared store (Redis) expire this long after the launcher stops heartbeating them,
# so a launcher that died takes its backends out of every gateway's routing.
SHARED_RECORD_TTL_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="config.toml", help="path of config.toml (default: %(default)s)")
    parser.add_argument("--no-preload", action="store_true", help="start without pulling or loading models")
    parser.add_argument(
        "--strict", action="store_true", help="exit with an error when a planned model cannot be preloaded"
    )
    parser.add_argument(
        "--speed", type=float, default=None, help="simulated rig only: time factor (overrides CORRAL_SIM_SPEED)"
    )
    parser.add_argument("--listen", default=None, help="gateway address HOST:PORT (overrides [gateway].listen)")
    parser.add_argument(
        "--base-port",
        type=int,
        default=None,
        help="first backend port; backends take consecutive ports from here (overrides [launcher].base_port)",
    )


@dataclass(frozen=True)
class UpOptions:
    preload: bool
    strict: bool
    speed: float | None
    listen_host: str
    listen_port: int


def options_from(args: argparse.Namespace, cfg: CorralConfig) -> UpOptions:
    host, port = cfg.gateway.listen_host, cfg.gateway.listen_port
    if args.listen:
        text = str(args.listen)
        host_part, sep, port_part = text.rpartition(":")
        if not sep or not port_part.isdigit() or not 0 <= int(port_part) <= 65535:
            raise ConfigError("--listen", f'must be "host:port", e.g. "127.0.0.1:11434", got {text!r}')
        host, port = (host_part.strip("[]") or "127.0.0.1"), int(port_part)
    if args.speed is not None and not args.speed > 0:
        raise ConfigError("--speed", f"must be > 0, got {args.speed}")
    return UpOptions(
        preload=cfg.launcher.preload and not args.no_preload,
        strict=bool(args.strict),
        speed=args.speed,
        listen_host=host,
        listen_port=port,
    )


def with_base_port(cfg: CorralConfig, base_port: int | None) -> CorralConfig:
    """The config with `--base-port` applied, checked like `[launcher].base_port`."""
    if base_port is None:
        return cfg
    if not 1024 <= base_port <= 65000:
        raise ConfigError("--base-port", f"must be between 1024 and 65000, got {base_port}")
    return replace(cfg, launcher=replace(cfg.launcher, base_port=base_port))


def run(args: argparse.Namespace) -> int:
    cfg = with_base_port(load_config(args.config), args.base_port)
    check_env_overrides(cfg.launcher)
    opts = options_from(args, cfg)
    from launcher.commands.gateway_workers import workers_warning  # lazily, like gateway.server

    if warning := workers_warning(cfg.gateway):
        print(f"corral up: {warning}", file=sys.stderr)
    return asyncio.run(_up(cfg, opts, ProgressPrinter(sys.stdout)))


class _Stopped(Exception):
    pass


class Stopper:
    """SIGTERM/SIGINT handling: the first signal asks the rig to stop, wherever startup is."""

    def __init__(self, out: ProgressPrinter) -> None:
        self.out = out
        self.event = asyncio.Event()
        self._signals = on_stop_signals(self._on_signal)

    def __enter__(self) -> Stopper:
        self._signals.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._signals.__exit__(None, None, None)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.event.is_set():
            self.out.line(f"{sig.name}: already stopping; backends get SIGKILL after their stop timeout")
            return
        self.out.line(f"{sig.name}: stopping")
        self.event.set()

    async def until_stopped(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro`, or cancel it and raise _Stopped when a stop signal comes first."""
        task = asyncio.ensure_future(coro)
        stop = asyncio.ensure_future(self.event.wait())
        try:
            await asyncio.wait({task, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _Stopped


def plan_lines(plan: Plan) -> list[str]:
    """A short plan table: one line per backend, then the warnings."""
    models = {m.name for b in plan.backends for m in b.models}
    lines = [f"plan: {len(plan.backends)} backend(s) for {len(models)} model(s) (`corral plan` explains why)"]
    rows = []
    for b in plan.backends:
        cards = " + ".join(b.gpu_names) or "CPU"
        if b.kind != "single":
            cards += f" ({b.kind})"
        held = ", ".join(
            f"{m.name} (ctx {m.num_ctx or 'auto'}{'' if m.num_gpu < 0 else f', {m.num_gpu} layers on GPU'})"
            for m in b.models
        )
        rows.append((b.id, cards, f":{b.port}", held or "(no model planned)"))
    widths = [max((len(r[i]) for r in rows), default=0) for i in range(3)]
    for row in rows:
        lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    lines.extend(f"  warning: {w}" for w in plan.warnings)
    return lines


def build_launches(
    plan: Plan, cfg: CorralConfig, argv: tuple[str, ...], *, models_dir: Path, sim: bool, speed: float | None
) -> list[BackendLaunch]:
    sim_rig = str(Path(cfg.source).resolve()) if sim else None
    launches = []
    for planned in plan.backends:
        env = backend_env(
            planned,
            cfg.launcher,
            models_dir=models_dir,
            base_env=os.environ,
            sim_rig=sim_rig,
            sim_speed=speed,
            secret_names=frozenset({cfg.gateway.api_keys_env, cfg.gateway.admin_keys_env}),
        )
        launches.append(BackendLaunch(planned, argv, env, host=cfg.launcher.host, log_dir=cfg.launcher.log_dir))
    return launches


async def open_shared_store(settings: GatewaySettings) -> tuple[StateStore, float | None]:
    """The state store the supervisor publishes to and the gateway reads, and the record TTL
    (records in a shared store expire; in memory they live as long as this process). Raises
    StoreUnreachable."""
    store = await open_checked_store(settings.state, settings.redis_url)
    return store, (SHARED_RECORD_TTL_S if settings.state == "redis" else None)


def ready_lines(url: str, plan: Plan, proxy_host: str) -> list[str]:
    models = [m.name for b in plan.backends for m in b.models]
    example = models[0] if models else "llama3.1:8b"
    for b in plan.backends:  # prefer a chat model for the example; embedding models cannot `run`
        chat = [m.name for m in b.models if "embed" not in m.name]
        if chat:
            example = chat[0]
            break
    body = json.dumps({"model": example, "messages": [{"role": "user", "content": "Why is the sky blue?"}]})
    return [
        f"ready: {url}  ({len(plan.backends)} backends, {len(set(models))} models; Ctrl-C to stop)",
        f"  try: OLLAMA_HOST={proxy_host} ollama run {example}",
        f"       curl {url}/api/chat -d '{body}'",
        f"watch: {url}/corral/  or  corral top --url {url}",
    ]


async def _up(cfg: CorralConfig, opts: UpOptions, out: ProgressPrinter) -> int:
    with Stopper(out) as stopper:
        try:
            code = await _up_until_stopped(cfg, opts, out, stopper)
        except _Stopped:
            code = 0
        if stopper.event.is_set():
            out.line("stopped: the gateway and every backend are down")
        return code


async def _up_until_stopped(cfg: CorralConfig, opts: UpOptions, out: ProgressPrinter, stopper: Stopper) -> int:
    rig = resolve_rig(cfg)
    if rig.message:
        out.line(rig.message)
    out.line(f"memory model: {rig.era_note}" + (f" (warning: {rig.era_warning})" if rig.era_warning else ""))
    the_plan = make_plan(rig.gpus, model_specs(cfg), cfg.launcher, rig.era)
    for line in plan_lines(the_plan):
        out.line(line)
    if not the_plan.ok or not the_plan.backends:
        for error in the_plan.errors or ("no backend to start: [[models]] is empty",):
            print(f"corral up: {error}", file=sys.stderr)
        return 1
    refusal = _gateway_refusal(cfg, opts, the_plan)
    if refusal:
        print(f"corral up: {refusal}", file=sys.stderr)
        return 1
    models_dir = resolve_models_dir(cfg.launcher.models_dir, cfg.source)
    try:
        store, ttl_s = await stopper.until_stopped(open_shared_store(cfg.gateway))
    except StoreUnreachable as e:
        print(f"corral up: {e}", file=sys.stderr)
        return 1
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        await store.close()
        print(f"corral up: cannot create the model store {models_dir}: {e.strerror or e}", file=sys.stderr)
        return 1
    sim = rig.mode == "sim"
    launches = build_launches(
        the_plan, cfg, tuple(rig.ollama_bin), models_dir=models_dir, sim=sim, speed=opts.speed if sim else None
    )
    host_name = socket.gethostname()
    keep_alive = {normalize_name(m.name): m.keep_alive for m in cfg.models if m.keep_alive is not None}

    def keep_alive_for(model: str) -> str:
        return keep_alive.get(normalize_name(model)) or cfg.launcher.keep_alive

    # The gateway listens before anything starts: `/`, /api/version and /api/tags answer at once,
    # model calls wait in its queue ("starting") until a backend is ready, and
    # GET /api/corral/ready is the ready signal (not "the port answers").
    gateway = await _start_gateway(cfg, opts, store)
    if gateway is None:
        await store.close()
        return 1
    out.line(f"listening: {gateway.url} (backends starting; {gateway.url}/api/corral/ready says when they are)")
    session = aiohttp.ClientSession(trust_env=False)

    def targets(processes: list[BackendProcess], sup: Supervisor) -> list[PreloadTarget]:
        return [
            PreloadTarget(p.id, p.launch.url, sup.store_id, p.launch.planned.models)
            for p in processes
            if p.launch.planned.models
        ]

    async def reload_after_restart(proc: BackendProcess) -> None:
        results = await preload(session, targets([proc], sup), keep_alive_for=keep_alive_for, progress=out)
        for result in results:
            out.line(f"  after restart: {result.describe()}")

    try:
        async with Supervisor(
            launches,
            Timing.from_settings(cfg.launcher),
            store=store,
            host_name=host_name,
            store_id=f"{host_name}:{models_dir}",
            record_ttl_s=ttl_s,
            # A shared store holds several hosts' backends: "<host>/g0", so ids cannot collide.
            record_prefix=f"{host_name}/" if ttl_s is not None else "",
            on_restart_ready=reload_after_restart if opts.preload else None,
        ) as sup:
            sup.warming = opts.preload
            out.line(f"starting {len(launches)} backend(s): {' '.join(rig.ollama_bin)}")
            failures = await stopper.until_stopped(sup.start_all())
            if failures:
                for failure in failures:
                    print(f"corral up: {failure}", file=sys.stderr)
                return 1
            out.line(f"{len(launches)} backend(s) ready")
            publisher = GpuPublisher(
                store,
                host_name,
                rig.gpus,
                backend_of={uuid: sup.record_prefix + b.id for b in the_plan.backends for uuid in b.gpu_uuids},
                planned_of=planned_bytes_per_card(the_plan),
                refresh=_refresh_for(sim, session, [launch.url for launch in launches], rig),
                ttl_s=ttl_s,
            )
            await publisher.start()
            try:
                if opts.preload:
                    code = await _preload(session, targets(sup.processes, sup), keep_alive_for, out, stopper, opts)
                    if code:
                        return code
                    await publisher.publish_once()  # show the preloaded models' memory at once
                await sup.end_warming()
                await gateway.end_startup()
                return await _serve(cfg, gateway, the_plan, out, stopper)
            finally:
                await gateway.drain(0.0)  # a no-op after _serve's drain; stops at once on an error path
                await publisher.close()
                out.line("stopping backends ...")
    finally:
        await gateway.drain(0.0)
        await session.close()
        await store.close()


def planned_bytes_per_card(plan: Plan) -> dict[str, int]:
    """GPU UUID -> the bytes the plan's models take on that card (for the views' memory bars)."""
    planned: dict[str, int] = {}
    for b in plan.backends:
        for m in b.models:
            shares = m.card_vram_bytes or tuple(m.vram_bytes // max(len(b.gpu_uuids), 1) for _ in b.gpu_uuids)
            for uuid, share in zip(b.gpu_uuids, shares, strict=False):
                planned[uuid] = planned.get(uuid, 0) + share
    return planned


def _gateway_refusal(cfg: CorralConfig, opts: UpOptions, plan: Plan) -> str:
    """Why the gateway could not serve at the end of startup, found before anything starts ("" if
    nothing is wrong): so a pull of many gigabytes is not wasted on a rig that cannot open its door.
    Raises ConfigError (exit 2) for an open non-loopback address without API keys."""
    check_listen_allowed(opts.listen_host, load_keys(cfg.gateway, os.environ))
    server_ssl_context(cfg.gateway)  # an unreadable or mismatched certificate: ConfigError now
    where = f"{opts.listen_host}:{opts.listen_port}"
    taken_by = next((b.id for b in plan.backends if opts.listen_port and b.port == opts.listen_port), "")
    if taken_by:
        return (
            f"backend {taken_by} is planned on port {opts.listen_port}, where the gateway listens ({where}); "
            "move [launcher].base_port or [gateway].listen"
        )
    try:
        busy = port_in_use(opts.listen_host, opts.listen_port)
    except SpawnError as e:
        return f"the gateway {e}; set [gateway].listen or pass --listen"
    if busy:
        return (
            f"the gateway cannot listen on {where}: already in use "
            "(a local `ollama serve` uses 11434 too); set [gateway].listen or pass --listen"
        )
    return ""


def _refresh_for(sim: bool, session: aiohttp.ClientSession, urls: list[str], rig: Rig) -> Refresh:
    if sim:
        return sim_refresh(session, urls, rig.gpus)
    return nvml_refresh(os.environ.get("CUDA_VISIBLE_DEVICES"))  # the same cards resolve_rig uses


async def _preload(
    session: aiohttp.ClientSession,
    targets: list[PreloadTarget],
    keep_alive_for: Callable[[str], str],
    out: ProgressPrinter,
    stopper: Stopper,
    opts: UpOptions,
) -> int:
    count = sum(len(t.models) for t in targets)
    out.line(f"preloading {count} model copies on {len(targets)} backend(s) ...")
    results = await stopper.until_stopped(preload(session, targets, keep_alive_for=keep_alive_for, progress=out))
    failed = [r for r in results if not r.ok]
    if not failed:
        out.line(f"preloaded {count} model copies")
        return 0
    for r in failed:
        print(f"corral up: PRELOAD FAILED: backend {r.backend_id}, model {r.model}: {r.error}", file=sys.stderr)
    if opts.strict:
        print("corral up: --strict: stopping because a planned model could not be preloaded", file=sys.stderr)
        return 1
    out.line(
        f"warning: {len(failed)} of {count} model copies are not preloaded (see above); their backends are up "
        "and will load them on first use"
    )
    return 0


async def _start_gateway(cfg: CorralConfig, opts: UpOptions, store: StateStore) -> GatewayServer | None:
    from gateway.server import GatewayServer

    gateway = GatewayServer(cfg.gateway, store, host=opts.listen_host, port=opts.listen_port, starting=True)
    try:
        await gateway.start()
    except OSError as e:
        print(f"corral up: the gateway cannot listen on {opts.listen_host}:{opts.listen_port}: {e}", file=sys.stderr)
        return None
    return gateway


async def _serve(cfg: CorralConfig, gateway: GatewayServer, plan: Plan, out: ProgressPrinter, stopper: Stopper) -> int:
    # OLLAMA_HOST takes host:port for plain HTTP; with TLS it needs the scheme (https://host:port).
    proxy_host = gateway.url.removeprefix("http://")
    for line in ready_lines(gateway.url, plan, proxy_host):
        out.line(line)
    await stopper.event.wait()
    out.line(f"draining the gateway (up to {cfg.gateway.drain_timeout_s:g}s) ...")
    if not await gateway.drain(cfg.gateway.drain_timeout_s):
        out.line("drain timeout: requests still running were cancelled")
    return 0
