"""What a backend record missing from the store means: removed, or not yet re-published.

A Redis that restarts empty loses every record at once, while the backends themselves are fine
(the gateway's own health checks still pass). Taken literally that removed the whole fleet until
each launcher's next heartbeat: 1,811 of 4,000 requests got 503 in one run. So the store's
`generation()` is watched: when it changes, records that vanished are kept for `grace_s` as long as
their backend stays healthy, which covers the launchers' re-publishing (at once on reconnect, at
the latest within one record TTL). Outside that window a missing record is a removal, as before.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence

from gateway.record import BackendRecord

log = logging.getLogger(__name__)

# How long records missing from a restarted store are kept for their healthy backends: above the
# launcher's record TTL (15 s) and the static backends' heartbeat (15 s), so every writer has
# re-published (or would have let its record expire) before the window closes.
RECORD_GRACE_S = 30.0


class RecordMemory:
    """Merges the store's current records with the ones a restarted store has not got back yet."""

    def __init__(self, grace_s: float = RECORD_GRACE_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._generation: str | None = None
        self._grace_until = 0.0

    @property
    def in_grace(self) -> bool:
        return self._clock() < self._grace_until

    def merge(
        self, records: Sequence[BackendRecord], generation: str, healthy: Mapping[str, BackendRecord]
    ) -> list[BackendRecord]:
        """The records to adopt: `records`, plus (within the grace window after the store's
        generation changed) the last-seen record of every healthy backend missing from them
        (`healthy`: backend id -> its record, for the backends whose health checks pass now)."""
        if self._generation is not None and generation != self._generation:
            self._grace_until = self._clock() + self.grace_s
            log.warning(
                "state store restarted (lost its records): keeping %d known backends for up to %.0fs "
                "while their records are re-published",
                len(healthy),
                self.grace_s,
            )
        self._generation = generation
        merged = list(records)
        if self.in_grace:
            present = {r.id for r in records}
            merged += [record for backend_id, record in healthy.items() if backend_id not in present]
        return merged
