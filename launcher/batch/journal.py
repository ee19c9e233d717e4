"""The output file as a journal: one JSON line per finished item, appended whole.

Each line goes out in one `write(2)` on a file opened with O_APPEND, so a process killed at any
moment leaves whole lines behind (the kernel holds what was written; SIGKILL loses nothing already
written). A crash of the machine itself can still leave a partial last line: `open_journal` finds a
last line without its newline, or one that is not JSON, and cuts it off before appending, so a
resume never misreads it. Lines are fsynced in groups (at most `FSYNC_EVERY_S` apart, and on close)
so that a power cut loses at most the last moments' answers, which a resume then asks for again.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launcher.batch.items import id_key

FSYNC_EVERY_S = 1.0


class JournalError(Exception):
    """The output file cannot be used as asked (exists without --resume/--overwrite, unreadable)."""


@dataclass
class Resumed:
    """What an existing output file already holds."""

    ok_keys: set[str] = field(default_factory=set)
    failed_keys: set[str] = field(default_factory=set)
    torn_bytes: int = 0  # bytes of a torn last line that were cut off
    bad_lines: int = 0  # complete lines that were not a result object (left in place, ignored)


def scan(data: bytes) -> tuple[Resumed, int]:
    """Read a journal's bytes: which ids are answered, and where the whole lines end."""
    resumed = Resumed()
    end = data.rfind(b"\n") + 1  # everything after the last newline is torn
    tail = data[end:]
    lines = data[:end].split(b"\n")[:-1]
    # A last line with its newline but not parseable is torn too (a crash between bytes of one
    # write can only hit the last line); earlier bad lines are someone else's edits: keep them.
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            end -= len(lines[-1]) + 1
            tail = lines.pop() + b"\n" + tail
    resumed.torn_bytes = len(tail)
    for raw in lines:
        try:
            obj = json.loads(raw)
        except ValueError:
            resumed.bad_lines += 1
            continue
        if not isinstance(obj, dict) or "id" not in obj:
            resumed.bad_lines += 1
            continue
        key = id_key(obj["id"])
        if obj.get("ok") is True:
            resumed.ok_keys.add(key)
        else:
            resumed.failed_keys.add(key)
    resumed.failed_keys -= resumed.ok_keys
    return resumed, end


class Journal:
    """An output file open for whole-line appends. Not safe across threads; one writer per file."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._last_sync = time.monotonic()
        self._unsynced = False

    def append(self, obj: dict[str, Any]) -> None:
        """Write `obj` as one line in one write call (retried for the rest on a short write)."""
        data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        self._unsynced = True
        if time.monotonic() - self._last_sync >= FSYNC_EVERY_S:
            self.sync()

    def sync(self) -> None:
        if self._unsynced:
            os.fsync(self._fd)
            self._unsynced = False
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1


def open_journal(path: Path, *, resume: bool, overwrite: bool) -> tuple[Journal, Resumed]:
    """Open `path` for appending results. Raises JournalError when it exists and neither `resume`
    nor `overwrite` is set, or when it cannot be read or written. With `resume`, a torn last line
    is cut off (and counted in `Resumed.torn_bytes`) before anything is appended."""
    exists = path.exists()
    if exists and not (resume or overwrite):
        raise JournalError(f"{path} exists: pass --resume to continue it or --overwrite to start again")
    if exists and path.is_dir():
        raise JournalError(f"{path} is a directory")
    resumed = Resumed()
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
    try:
        if exists and resume:
            data = path.read_bytes()
            resumed, end = scan(data)
            if end < len(data):
                with path.open("r+b") as f:
                    f.truncate(end)
                    f.flush()
                    os.fsync(f.fileno())
        elif overwrite:
            flags |= os.O_TRUNC
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        raise JournalError(f"cannot open {path}: {e.strerror}") from None
    return Journal(path, fd), resumed
