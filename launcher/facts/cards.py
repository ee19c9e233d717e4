"""Built-in table of common GPUs: the specs the performance model needs.

Figures are the vendors' published numbers: memory size as the driver reports it (GiB), peak memory
bandwidth (GB/s, decimal), dense FP16 tensor throughput (TFLOPS, no sparsity) and CUDA compute
capability. NVML gives us the name, memory and compute capability of a real card but not its
bandwidth or FLOPS, so discovery looks the card up here by name; the simulated rig uses the same
table, with per-card overrides in config.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

GIB = 1024**3


@dataclass(frozen=True)
class CardSpec:
    """What the performance model knows about one GPU model."""

    name: str
    vram_bytes: int
    mem_bw_gbps: float
    fp16_tflops: float
    compute_capability: tuple[int, int]
    aliases: tuple[str, ...] = ()

    @property
    def vram_gib(self) -> float:
        return self.vram_bytes / GIB

    def with_overrides(
        self,
        *,
        vram_gb: float | None = None,
        mem_bw_gbps: float | None = None,
        fp16_tflops: float | None = None,
    ) -> CardSpec:
        """The same card with config overrides applied (`vram_gb` is GiB, like NVML reports)."""
        return replace(
            self,
            vram_bytes=self.vram_bytes if vram_gb is None else int(vram_gb * GIB),
            mem_bw_gbps=self.mem_bw_gbps if mem_bw_gbps is None else mem_bw_gbps,
            fp16_tflops=self.fp16_tflops if fp16_tflops is None else fp16_tflops,
        )


def _card(
    name: str,
    vram_gib: float,
    mem_bw_gbps: float,
    fp16_tflops: float,
    cc: tuple[int, int],
    *aliases: str,
) -> CardSpec:
    return CardSpec(name, int(vram_gib * GIB), mem_bw_gbps, fp16_tflops, cc, aliases)


# Consumer cards quote FP16 tensor throughput with FP16 accumulate; datacenter cards with FP32.
# Either way it only feeds the prefill estimate, where llama.cpp reaches a fraction of peak.
CARDS: tuple[CardSpec, ...] = (
    # Datacenter
    _card("H200", 141, 4800, 989, (9, 0), "H200 141GB", "H200 NVL"),
    _card("H100 80GB", 80, 3350, 989, (9, 0), "H100", "H100 SXM", "H100 80GB HBM3"),
    _card("H100 PCIe", 80, 2000, 756, (9, 0), "H100 80GB PCIe"),
    _card("A100 80GB", 80, 2039, 312, (8, 0), "A100-SXM4-80GB", "A100 80GB PCIe", "A100-PCIE-80GB"),
    _card("A100 40GB", 40, 1555, 312, (8, 0), "A100", "A100-SXM4-40GB", "A100-PCIE-40GB"),
    _card("L40S", 48, 864, 362, (8, 9)),
    _card("L40", 48, 864, 181, (8, 9)),
    _card("L4", 24, 300, 121, (8, 9)),
    _card("A40", 48, 696, 150, (8, 6)),
    _card("A10", 24, 600, 125, (8, 6), "A10G"),
    _card("T4", 16, 320, 65, (7, 5), "Tesla T4"),
    _card("V100 32GB", 32, 900, 125, (7, 0), "Tesla V100-SXM2-32GB", "V100"),
    _card("B200", 180, 8000, 2250, (10, 0)),
    # Workstation
    _card("RTX 6000 Ada", 48, 960, 364, (8, 9), "RTX 6000 Ada Generation"),
    _card("A6000", 48, 768, 155, (8, 6), "RTX A6000"),
    _card("A5000", 24, 768, 111, (8, 6), "RTX A5000"),
    _card("A4000", 16, 448, 77, (8, 6), "RTX A4000"),
    # Consumer
    _card("RTX 5090", 32, 1792, 419, (12, 0), "GeForce RTX 5090"),
    _card("RTX 5080", 16, 960, 225, (12, 0), "GeForce RTX 5080"),
    _card("RTX 4090", 24, 1008, 330, (8, 9), "GeForce RTX 4090"),
    _card("RTX 4080", 16, 717, 195, (8, 9), "GeForce RTX 4080", "RTX 4080 SUPER"),
    _card("RTX 4070 Ti", 12, 504, 160, (8, 9), "GeForce RTX 4070 Ti"),
    _card("RTX 4060 Ti 16GB", 16, 288, 88, (8, 9), "GeForce RTX 4060 Ti"),
    _card("RTX 3090", 24, 936, 142, (8, 6), "GeForce RTX 3090", "RTX 3090 Ti"),
    _card("RTX 3080", 10, 760, 119, (8, 6), "GeForce RTX 3080"),
    _card("RTX 3060", 12, 360, 51, (8, 6), "GeForce RTX 3060"),
)


def _key(name: str) -> str:
    """Normalise a card name: NVML says "NVIDIA GeForce RTX 4090", config says "RTX 4090"."""
    words = re.sub(r"[^a-z0-9]+", " ", name.lower()).split()
    return " ".join(w for w in words if w not in {"nvidia", "geforce", "tesla"})


_BY_KEY: dict[str, CardSpec] = {}
for _spec in CARDS:
    for _alias in (_spec.name, *_spec.aliases):
        _BY_KEY.setdefault(_key(_alias), _spec)


def find_card(name: str) -> CardSpec | None:
    """Look a card up by its marketing or NVML name; None when it is not in the table."""
    return _BY_KEY.get(_key(name))


def card_names() -> list[str]:
    return [c.name for c in CARDS]
