"""`corral batch INPUT.jsonl -o OUTPUT.jsonl`: a batch job over the fleet, resumable, one answer per item.

A thin layer over `launcher.batch.run_batch`: it reads and checks the whole input first (duplicate
ids are refused before anything is sent; standard input is spooled to a temporary file), opens the
output as a journal (refused when it exists without --resume or --overwrite; a torn last line is
cut off), writes bad lines as failed items, runs the rest and prints a summary. The API key comes
from CORRAL_API_KEY or OLLAMA_API_KEY, never the command line (it would show in `ps`).

Exit status: 0 every item ok, 1 some failed, 2 bad usage / duplicate ids / unreadable input or
output, 130 interrupted (the first Ctrl-C stops sending and lets in-flight items finish; the second
aborts them).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from launcher.batch.engine import run_batch
from launcher.batch.items import InputError, check_unique, read_lines
from launcher.batch.journal import JournalError, open_journal
from launcher.batch.progress import show_progress
from launcher.batch.stats import BatchStats
from launcher.batch.types import BatchItem, BatchOptions, DuplicateIdError, Endpoint, ItemResult

DEFAULT_URL = "http://127.0.0.1:11434"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _concurrency(text: str) -> int | None:
    if text == "auto":
        return None
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be auto or a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be auto or a whole number >= 1, got {text!r}")
    return n


def _non_negative_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {text!r}")
    return n


def _positive_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        x = 0.0
    if not x > 0 or x == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return x


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", metavar="INPUT.jsonl", help="one JSON request per line; - reads standard input")
    parser.add_argument("-o", "--output", required=True, metavar="OUTPUT.jsonl", help="one result line per item")
    parser.add_argument(
        "--url", default=None, help=f"gateway or Ollama URL (default: $OLLAMA_HOST, else {DEFAULT_URL})"
    )
    parser.add_argument("--model", default=None, help="model for lines that name none")
    parser.add_argument(
        "--endpoint", choices=[e.value for e in Endpoint], default=None, help="default: inferred from each line"
    )
    parser.add_argument(
        "--concurrency", type=_concurrency, default=None, metavar="auto|N", help="requests in flight (default: auto)"
    )
    parser.add_argument("--retries", type=_non_negative_int, default=5, help="retries of backend faults (default 5)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="skip ids already answered ok in OUTPUT, append")
    again.add_argument("--overwrite", action="store_true", help="start OUTPUT again from empty")
    parser.add_argument("--priority", choices=["batch", "interactive"], default="batch", help="gateway lane")
    parser.add_argument("--timeout-s", type=_positive_float, default=600.0, help="limit of one attempt (default 600)")


def _url(given: str | None) -> str:
    url = given or os.environ.get("OLLAMA_HOST", "") or DEFAULT_URL
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _fail(message: str) -> int:
    print(f"corral batch: {message}", file=sys.stderr)
    return EXIT_USAGE


def run(args: argparse.Namespace) -> int:
    spooled: Path | None = None
    try:
        if args.input == "-":
            # Spool standard input so the whole input can be checked before anything is sent.
            with tempfile.NamedTemporaryFile("wb", prefix="corral-batch-", suffix=".jsonl", delete=False) as f:
                shutil.copyfileobj(sys.stdin.buffer, f)
                spooled = Path(f.name)
        source = spooled or Path(args.input)
        try:
            text = source.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return _fail(f"cannot read {args.input}: {getattr(e, 'strerror', None) or e}")
        endpoint = Endpoint(args.endpoint) if args.endpoint else None
        parsed = list(read_lines(text.splitlines(), model=args.model, endpoint=endpoint))
        try:
            check_unique(parsed)
        except DuplicateIdError as e:
            return _fail(f"{args.input}: {e}; nothing was sent")
        try:
            journal, resumed = open_journal(Path(args.output), resume=args.resume, overwrite=args.overwrite)
        except JournalError as e:
            return _fail(str(e))
        try:
            if resumed.torn_bytes:
                print(f"repaired {args.output}: dropped a torn last line ({resumed.torn_bytes} bytes)", file=sys.stderr)
            return asyncio.run(_run(args, parsed, journal, resumed.ok_keys))
        finally:
            journal.close()
    finally:
        if spooled is not None:
            spooled.unlink(missing_ok=True)


async def _run(args: argparse.Namespace, parsed: list[BatchItem | InputError], journal: Any, done: set[str]) -> int:
    stats = BatchStats()
    errors = [p for p in parsed if isinstance(p, InputError)]
    items = [p for p in parsed if isinstance(p, BatchItem) and p.key not in done]
    stats.skipped = sum(1 for p in parsed if isinstance(p, BatchItem) and p.key in done)
    stats.total = len(items) + len(errors)
    for error in errors:
        print(error.message, file=sys.stderr)
        result = ItemResult(error.id, error.key, False, status=400, error=error.message, line=error.line)
        stats.add(result)
        journal.append(result.to_json())

    options = BatchOptions(
        url=_url(args.url),
        model=args.model,
        endpoint=Endpoint(args.endpoint) if args.endpoint else None,
        concurrency=args.concurrency,
        retries=args.retries,
        priority=args.priority,
        timeout_s=args.timeout_s,
        api_key=os.environ.get("CORRAL_API_KEY") or os.environ.get("OLLAMA_API_KEY") or "",
    )
    stop = asyncio.Event()
    interrupts = 0
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def on_interrupt() -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            stop.set()
            print("\ninterrupted: sending no more; waiting for the items in flight (Ctrl-C again aborts them)",
                  file=sys.stderr, flush=True)  # fmt: skip
        elif main_task is not None:
            main_task.cancel()

    loop.add_signal_handler(signal.SIGINT, on_interrupt)
    try:
        async with show_progress(stats, sys.stderr):
            async for result in run_batch(items, options, stop=stop, stats=stats):
                journal.append(result.to_json())
    except asyncio.CancelledError:
        print("aborted: the items in flight were dropped; --resume asks for them again", file=sys.stderr)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
    for line in stats.summary_lines():
        print(line, flush=True)
    if interrupts:
        unanswered = stats.total - stats.done
        print(f"interrupted: {unanswered} items not sent or not finished; run again with --resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_FAILED if stats.failed else EXIT_OK
