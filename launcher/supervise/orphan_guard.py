"""The orphan guard: a tiny helper process that stops the launcher's backends if the launcher dies.

`python -m launcher.orphan_guard GRACE_S` reads its stdin, a pipe whose only writer is the
launcher: `+PGID` registers a backend's process group, `-PGID` forgets it. When the pipe closes
(the launcher exited, however it died, SIGKILL included, since the kernel closes its descriptors),
the guard sends SIGTERM to every registered group, waits up to GRACE_S for them to empty, and
sends SIGKILL to what is left.

Why a process and not only PR_SET_PDEATHSIG: the parent-death signal reaches the launcher's
direct children only. `ollama serve` starts llama-server runners (which hold the VRAM) without
one; they stay in the backend's process group, and this guard is what clears that group.

Only the standard library is imported here: the guard must start fast and never fail to import.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def group_alive(pgid: int) -> bool:
    """True while the process group has a member that is not a zombie.

    A zombie still counts for kill(2), and an orphaned runner's zombie lingers for as long as PID 1
    fails to reap it (a container without an init), so on Linux the members are looked up in /proc.
    """
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if not os.path.isdir("/proc/self"):
        return True
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited while we looked
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False


def _signal(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def clear_groups(pgids: set[int], grace_s: float) -> None:
    """SIGTERM every group, wait up to grace_s for all to empty, SIGKILL the rest."""
    for pgid in pgids:
        _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    remaining = {p for p in pgids if group_alive(p)}
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = {p for p in remaining if group_alive(p)}
    for pgid in remaining:
        _signal(pgid, signal.SIGKILL)


def main(argv: list[str]) -> int:
    grace_s = float(argv[1]) if len(argv) > 1 else 10.0
    # Ctrl-C and a hang-up reach the launcher's whole process group; the launcher handles them
    # and then closes our pipe, which is the only signal this process acts on.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    pgids: set[int] = set()
    for line in sys.stdin:
        text = line.strip()
        if len(text) < 2 or not text[1:].isdigit():
            continue
        if text[0] == "+":
            pgids.add(int(text[1:]))
        elif text[0] == "-":
            pgids.discard(int(text[1:]))
    clear_groups(pgids, grace_s)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
