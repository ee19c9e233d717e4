"""Warnings for the live views, derived from the status document's backend rows (pure).

backend down (failing health checks, or its process died and is being started again), a restart
loop (restarted often and never stable for long), CPU offload (a CPU backend, or a resident model
partly in system memory, which decodes at host-memory speed). The store being unreachable is added
by the status handler, which is the one that read it.
"""

from __future__ import annotations

from collections.abc import Sequence

from gateway.api.status_doc import BackendDoc, WarningDoc

GIB = 1024**3
# Restarted this often, and up for less than STABLE_S (or not up at all): a loop, not a blip.
RESTART_LOOP_COUNT = 3
STABLE_S = 600.0
# Why a backend is down, by its record's state (a ready record: its health checks fail).
DOWN_BECAUSE = {"starting": "being restarted", "failed": "its process is not running"}


def _reason(backend: BackendDoc) -> str:
    return backend["last_error"] or backend["health_error"] or ""


def fleet_warnings(backends: Sequence[BackendDoc]) -> list[WarningDoc]:
    warnings: list[WarningDoc] = []
    for b in backends:
        bid = b["id"]
        reason = _reason(b)
        suffix = f": {reason}" if reason else ""
        if b["status"] == "down":
            what = DOWN_BECAUSE.get(b["state"], "failing health checks")
            warnings.append(
                WarningDoc(kind="backend_down", subject=bid, message=f"backend {bid} is down ({what}){suffix}")
            )
        uptime = b["uptime_s"]
        if b["restarts"] >= RESTART_LOOP_COUNT and (uptime is None or uptime < STABLE_S):
            warnings.append(
                WarningDoc(
                    kind="restart_loop",
                    subject=bid,
                    message=f"backend {bid} restarted {b['restarts']} times and is not staying up{suffix}",
                )
            )
        if b["kind"] == "cpu":
            warnings.append(
                WarningDoc(kind="cpu_offload", subject=bid, message=f"backend {bid} runs models on the CPU (slow)")
            )
            continue
        for m in b["models"]:
            if m["cpu_bytes"] > 0:
                share = 100 * m["cpu_bytes"] / max(m["cpu_bytes"] + m["size_vram_bytes"], 1)
                warnings.append(
                    WarningDoc(
                        kind="cpu_offload",
                        subject=bid,
                        message=(
                            f"{m['name']} on {bid} is {share:.0f}% in system memory "
                            f"({m['cpu_bytes'] / GIB:.1f} GiB offloaded to the CPU): it decodes at host-memory speed"
                        ),
                    )
                )
    return warnings
