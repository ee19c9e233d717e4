"""What the gateway last learned from the state store besides backend records: whether it answered,
and the GPU inventory the launchers published.

The poller writes here after each of its store calls; /metrics reads it at scrape time without any
I/O (`corral_state_store_up`, `corral_gpu_memory_used_bytes`). A failed inventory read keeps the
last good rows, so a store blip does not make every GPU series vanish for one scrape.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from launcher.facts.gpuinfo import PublishedGpu


@dataclass
class StoreWatch:
    # None until the first store call finished: /metrics then reports nothing rather than a guess.
    up: bool | None = None
    last_error: str = ""
    changed_at: float = 0.0
    gpus: dict[str, list[PublishedGpu]] = field(default_factory=dict)  # host -> its published cards

    def answered(self) -> None:
        if self.up is not True:
            self.changed_at = time.time()
        self.up = True
        self.last_error = ""

    def failed(self, error: BaseException) -> None:
        if self.up is not False:
            self.changed_at = time.time()
        self.up = False
        self.last_error = str(error) or type(error).__name__

    def set_inventory(self, gpus: dict[str, list[PublishedGpu]]) -> None:
        self.gpus = {host: list(rows) for host, rows in gpus.items()}
