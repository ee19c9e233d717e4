"""`corral top`: the fleet live in the terminal, like nvtop for a rig of Ollama backends.

Reads the gateway's status document (`GET /api/corral/status`, the same one `corral status` and
the page at /corral/ read) about once a second and redraws it with rich's live display: GPUs with
memory used / planned / free, backends with their models and slots, per-model traffic as this
gateway saw it, the last routing decisions, and warnings. `q` quits (Ctrl-C too). `--once` prints
one frame and exits, for scripts: status 1 with one line on stderr when the gateway cannot be read.
The gateway's address and key are found as `corral status` finds them.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from gateway.api.status_doc import BackendDoc, GpuDoc, StatusDoc
from launcher.commands.status import StatusError, add_gateway_arguments, duration, fetch_status, gateway_url

GIB = 1024**3
BAR_WIDTH = 20
DECISIONS_SHOWN = 8
FETCH_TIMEOUT_S = 3.0  # short: a hung gateway must not keep `q` from working for long
ONCE_WIDTH = 150  # --once into a pipe: wide enough for every column, rich would assume 80
STATUS_STYLE = {"ready": "green", "down": "bold red", "starting": "yellow", "draining": "yellow"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_gateway_arguments(parser)
    parser.add_argument("--once", action="store_true", help="print one frame and exit (for scripts)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def memory_bar(gpu: GpuDoc, width: int = BAR_WIDTH) -> Text:
    """Used (solid), planned beyond used (shaded), free (dots): one cell per 1/width of the card."""
    total = gpu.get("memory_total_bytes") or 0
    if total <= 0:
        return Text("?" * width, style="dim")
    used = round(width * min(gpu.get("memory_used_bytes", 0) / total, 1.0))
    planned = max(round(width * min(gpu.get("memory_planned_bytes", 0) / total, 1.0)) - used, 0)
    bar = Text()
    bar.append("█" * used, style="blue")
    bar.append("▒" * planned, style="cyan")
    bar.append("·" * (width - used - planned), style="dim")
    return bar


def _sensors(gpu: GpuDoc) -> tuple[str, str]:
    util, temp = gpu.get("utilization_pct"), gpu.get("temperature_c")
    return ("-" if util is None else f"{util}%"), ("-" if temp is None else f"{temp}°C")


def gpu_table(status: StatusDoc) -> Table:
    table = Table(title="GPUs", title_justify="left", expand=False, pad_edge=False)
    for header in ("HOST", "#", "NAME", "BACKEND", "MEMORY (used █ planned ▒)", "USED / TOTAL GiB"):
        table.add_column(header, no_wrap=True)
    for header in ("PLANNED", "FREE", "UTIL", "TEMP"):
        table.add_column(header, justify="right", no_wrap=True)
    for host, cards in sorted((status.get("gpus") or {}).items()):
        for gpu in cards:
            util, temp = _sensors(gpu)
            table.add_row(
                host,
                str(gpu.get("index", "?")),
                gpu.get("name", "?"),
                gpu.get("backend") or "-",
                memory_bar(gpu),
                f"{_gib(gpu.get('memory_used_bytes', 0))} / {_gib(gpu.get('memory_total_bytes', 0))}",
                _gib(gpu.get("memory_planned_bytes", 0)),
                _gib(gpu.get("memory_free_bytes", 0)),
                util,
                temp,
            )
    return table


def _expires(expires_at: float | None, now: float) -> str:
    if not expires_at:
        return "-"
    return "never" if expires_at - now > 10 * 365 * 86400 else duration(expires_at - now)


def _backend_cells(b: BackendDoc) -> list[RenderableType]:
    word = b.get("status", b.get("state", "?"))
    uptime = b.get("uptime_s")
    gpus = " + ".join(b.get("gpu_names") or []) or "CPU"
    if b.get("kind", "single") != "single":
        gpus += f" ({b.get('kind')})"
    return [
        b.get("id", "?"),
        Text(word, style=STATUS_STYLE.get(word, "")),
        "-" if uptime is None else duration(uptime),
        str(b.get("restarts", 0)),
        gpus,
    ]


def backend_table(status: StatusDoc) -> Table:
    now = float(status.get("gateway", {}).get("now") or time.time())
    table = Table(title="Backends", title_justify="left", pad_edge=False)
    for header in ("ID", "STATUS", "UPTIME", "RESTARTS", "GPUS", "MODEL", "STATE"):
        table.add_column(header, no_wrap=True)
    for header in ("CTX", "VRAM GiB", "EXPIRES", "SLOTS", "QUEUE"):
        table.add_column(header, justify="right", no_wrap=True)
    for b in status.get("backends") or []:
        cells = _backend_cells(b)
        models = b.get("models") or []
        if not models:
            table.add_row(*cells, "(none)", *[""] * 6)
        for i, m in enumerate(models):
            state = "loading" if m.get("loading") else "resident" if m.get("resident") else "planned"
            table.add_row(
                *(cells if i == 0 else [""] * len(cells)),
                m.get("name", "?"),
                state,
                str(m.get("context_length") or "-"),
                _gib(m.get("size_vram_bytes", 0)) if m.get("resident") else "-",
                _expires(m.get("expires_at"), now),
                f"{m.get('busy', 0)}/{m.get('slots', 0)}",
                str(m.get("queued", 0)),
            )
        table.add_section()
    return table


def _secs(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def traffic_table(status: StatusDoc) -> Table:
    window = float(status.get("gateway", {}).get("stats_window_s") or 0)
    title = f"Models (last {duration(window)}, this gateway)" if window else "Models"
    table = Table(title=title, title_justify="left", pad_edge=False)
    table.add_column("MODEL", no_wrap=True)
    for header in ("REQ/S", "TTFT P50", "TTFT P95", "TOKENS/S", "IN FLIGHT", "QUEUED", "ERRORS"):
        table.add_column(header, justify="right", no_wrap=True)
    for m in status.get("models") or []:
        table.add_row(
            m.get("model", "?"),
            f"{m.get('requests_per_s', 0):.2f}",
            _secs(m.get("ttft_p50_s")),
            _secs(m.get("ttft_p95_s")),
            f"{m.get('tokens_per_s', 0):.1f}",
            str(m.get("in_flight", 0)),
            str(m.get("queued", 0)),
            f"{m.get('errors', 0)}/{m.get('requests', 0)}",
        )
    return table


def decision_table(status: StatusDoc, limit: int = DECISIONS_SHOWN) -> Table:
    table = Table(title="Routing decisions (newest first)", title_justify="left", pad_edge=False)
    for header in ("TIME", "MODEL", "DECISION", "REASON", "BACKEND"):
        table.add_column(header, no_wrap=True)
    table.add_column("EXPECTED", justify="right", no_wrap=True)
    for d in (status.get("decisions") or [])[:limit]:
        table.add_row(
            datetime.fromtimestamp(d.get("at", 0)).strftime("%H:%M:%S"),
            d.get("model", "?"),
            d.get("decision", "?"),
            d.get("reason", "?"),
            d.get("backend") or "-",
            _secs(d.get("expected_ttft_s")),
        )
    return table


def header(status: StatusDoc, url: str) -> Text:
    g = status.get("gateway", {})
    store = g.get("store", "?") if g.get("store_ok", True) else f"{g.get('store', '?')} UNREACHABLE"
    text = Text()
    text.append("corral top ", style="bold")
    text.append(
        f"{url}  corral {g.get('version', '?')}  policy {g.get('policy', '?')}  up {duration(g.get('uptime_s', 0))}  "
        f"active {g.get('active_requests', 0)}  store {store}"
    )
    return text


def frame(status: StatusDoc, url: str) -> Group:
    """One screen of `corral top` for one status document."""
    parts: list[RenderableType] = [header(status, url)]
    for w in status.get("warnings") or []:
        style = "bold red" if w.get("kind") in ("backend_down", "store_unreachable") else "yellow"
        parts.append(Text(f"! {w.get('message', '?')}", style=style))
    parts += [gpu_table(status), backend_table(status), traffic_table(status), decision_table(status)]
    return Group(*parts)


def error_frame(url: str, error: str) -> Group:
    return Group(Text(f"corral top {url}", style="bold"), Text(error, style="bold red"), Text("retrying ..."))


@contextlib.contextmanager
def keypresses() -> Iterator[KeyReader]:
    reader = KeyReader()
    try:
        reader.start()
        yield reader
    finally:
        reader.stop()


class KeyReader:
    """Single keys from a terminal without Enter (cbreak mode), restored on stop. Without a
    terminal (a pipe, a service) it only waits: quit with Ctrl-C."""

    def __init__(self) -> None:
        self._saved: list[Any] | None = None  # termios attributes to restore
        self._fd = -1

    def start(self) -> None:
        if not sys.stdin.isatty():
            return
        import termios
        import tty

        self._fd = sys.stdin.fileno()
        self._saved = termios.tcgetattr(self._fd)
        tty.setcbreak(self._fd)

    def stop(self) -> None:
        if self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None

    def quit_within(self, timeout_s: float) -> bool:
        """Wait up to timeout_s; True when `q` was pressed."""
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if self._saved is None:
                time.sleep(left)
                return False
            ready, _, _ = select.select([self._fd], [], [], left)
            if ready and os.read(self._fd, 1) in (b"q", b"Q"):
                return True
        return False


def run(args: argparse.Namespace) -> int:
    url = gateway_url(args)
    api_key = args.api_key or os.environ.get("CORRAL_API_KEY") or None
    if args.once:
        try:
            status = fetch_status(url, api_key, timeout_s=FETCH_TIMEOUT_S * 3)
        except StatusError as e:
            print(f"corral top: {e}", file=sys.stderr)
            return 1
        Console(width=None if sys.stdout.isatty() else ONCE_WIDTH).print(frame(status, url))
        return 0
    interval_s = max(float(args.interval), 0.1)
    console = Console()
    with keypresses() as keys, Live(console=console, screen=True, auto_refresh=False) as live:
        while True:
            try:
                view: RenderableType = frame(fetch_status(url, api_key, timeout_s=FETCH_TIMEOUT_S), url)
            except StatusError as e:
                view = error_frame(url, str(e))
            live.update(view, refresh=True)
            if keys.quit_within(interval_s):
                return 0
