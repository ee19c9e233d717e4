"""GPU inventory: what the planner knows about each card. The only module that imports pynvml.

`GpuInfo` is the inventory row; `simulated_inventory` builds one from the config's `[sim]` section.
NVML discovery (`discover`) is filled in below.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from launcher.cards import CardSpec, find_card
from launcher.config import SimGpu


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as discovered (NVML) or simulated. Memory in bytes; `card` carries bandwidth and FLOPS."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    memory_used_bytes: int
    card: CardSpec  # table entry (or one built from NVML clocks) with bandwidth and FP16 TFLOPS
    compute_capability: tuple[int, int] = (0, 0)
    sm_count: int = 0
    sm_clock_mhz: int = 0
    mem_clock_mhz: int = 0
    mem_bus_width_bits: int = 0
    pcie_gen: int = 0
    pcie_width: int = 0
    nvlink_peers: tuple[str, ...] = ()  # UUIDs of cards reachable over NVLink
    temperature_c: int | None = None
    power_w: float | None = None
    utilization_pct: int | None = None
    mig_enabled: bool = False
    simulated: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def mem_bw_gbps(self) -> float:
        return self.card.mem_bw_gbps


def sim_uuid(index: int) -> str:
    return f"GPU-sim-{index:04d}"


def simulated_card(gpu: SimGpu) -> CardSpec:
    """The table card for a `[[sim.gpus]]` entry with its overrides applied."""
    base = find_card(gpu.name)
    if base is None:  # config validation already refused unknown names
        raise ValueError(f"unknown card {gpu.name!r}")
    return base.with_overrides(vram_gb=gpu.vram_gb, mem_bw_gbps=gpu.mem_bw_gbps, fp16_tflops=gpu.fp16_tflops)


def simulated_inventory(gpus: Sequence[SimGpu]) -> list[GpuInfo]:
    """The simulated rig's cards, all memory free, indexed in config order."""
    inventory = []
    for i, gpu in enumerate(gpus):
        card = simulated_card(gpu)
        inventory.append(
            GpuInfo(
                index=i,
                uuid=gpu.uuid or sim_uuid(i),
                name=card.name,
                memory_total_bytes=card.vram_bytes,
                memory_free_bytes=card.vram_bytes,
                memory_used_bytes=0,
                card=card,
                compute_capability=card.compute_capability,
                simulated=True,
            )
        )
    return inventory
