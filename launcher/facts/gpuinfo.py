"""The GPU inventory row, `GpuInfo`, and its JSON form (state store, `corral status`, fixtures).

`PublishedGpu` is the typed contract between a launcher that publishes its cards into the state
store and the gateway that reads them back (`StateStore.put_gpus` / `list_gpus`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from launcher.facts.cards import CardSpec


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as discovered (NVML) or simulated. Memory in bytes; `card` carries bandwidth and FLOPS.

    `index` is NVML's (nvidia-smi's) index; a MIG instance carries its parent's index and UUID
    (`mig_parent_uuid`) and its own "MIG-..." UUID. Fields NVML would not report stay 0 / None.
    """

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
    pci_bus_id: str = ""
    mig_parent_uuid: str | None = None

    @property
    def mem_bw_gbps(self) -> float:
        return self.card.mem_bw_gbps


def card_to_json(card: CardSpec) -> dict[str, Any]:
    return {
        "name": card.name,
        "vram_bytes": card.vram_bytes,
        "mem_bw_gbps": card.mem_bw_gbps,
        "fp16_tflops": card.fp16_tflops,
        "compute_capability": list(card.compute_capability),
        "aliases": list(card.aliases),
    }


def inventory_to_json(gpus: Sequence[GpuInfo]) -> list[dict[str, Any]]:
    """Plain JSON rows (tuples as lists), one per GPU; `inventory_from_json` reverses it exactly."""
    rows = []
    for gpu in gpus:
        row = asdict(gpu)
        row["card"] = card_to_json(gpu.card)
        row["compute_capability"] = list(gpu.compute_capability)
        row["nvlink_peers"] = list(gpu.nvlink_peers)
        rows.append(row)
    return rows


def _pair(value: Any, where: str) -> tuple[int, int]:
    if not isinstance(value, list | tuple) or len(value) != 2 or not all(isinstance(v, int) for v in value):
        raise ValueError(f"{where}: expected [major, minor], got {value!r}")
    return int(value[0]), int(value[1])


def card_from_json(data: Any, where: str = "card") -> CardSpec:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object, got {data!r}")
    try:
        return CardSpec(
            name=str(data["name"]),
            vram_bytes=int(data["vram_bytes"]),
            mem_bw_gbps=float(data["mem_bw_gbps"]),
            fp16_tflops=float(data["fp16_tflops"]),
            compute_capability=_pair(data["compute_capability"], f"{where}.compute_capability"),
            aliases=tuple(str(a) for a in data.get("aliases", ())),
        )
    except KeyError as exc:
        raise ValueError(f"{where}: missing {exc.args[0]!r}") from None


_GPU_FIELDS = {f.name for f in fields(GpuInfo)}
_REQUIRED_GPU_FIELDS = ("index", "uuid", "name", "memory_total_bytes", "memory_free_bytes", "memory_used_bytes", "card")


def inventory_from_json(rows: Sequence[Any]) -> list[GpuInfo]:
    """GpuInfo rows back from `inventory_to_json` output. Raises ValueError naming the bad row and key."""
    gpus = []
    for i, row in enumerate(rows):
        where = f"gpus[{i}]"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {row!r}")
        unknown = sorted(set(row) - _GPU_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(unknown)}")
        missing = [key for key in _REQUIRED_GPU_FIELDS if key not in row]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        values = dict(row)
        values["card"] = card_from_json(row["card"], f"{where}.card")
        if "compute_capability" in row:
            values["compute_capability"] = _pair(row["compute_capability"], f"{where}.compute_capability")
        values["nvlink_peers"] = tuple(row.get("nvlink_peers", ()))
        values["extra"] = {str(k): str(v) for k, v in row.get("extra", {}).items()}
        gpus.append(GpuInfo(**values))
    return gpus


@dataclass(frozen=True)
class PublishedGpu:
    """One card as a launcher publishes it: the inventory row and the backend that uses it."""

    gpu: GpuInfo
    backend: str = ""  # the backend id whose CUDA_VISIBLE_DEVICES holds this card; "" when unused
    planned_bytes: int = 0  # what the plan's models take on this card (the views' memory bars); 0: unknown

    def to_json(self) -> dict[str, Any]:
        """`inventory_to_json`'s row with "backend" and "memory_planned_bytes" keys."""
        return inventory_to_json([self.gpu])[0] | {"backend": self.backend, "memory_planned_bytes": self.planned_bytes}

    @classmethod
    def from_json(cls, data: Any, where: str = "gpu") -> PublishedGpu:
        """Inverse of `to_json`. Raises ValueError naming the bad key."""
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected an object, got {data!r}")
        row = dict(data)
        backend = str(row.pop("backend", "") or "")
        planned = row.pop("memory_planned_bytes", 0)
        if not isinstance(planned, int) or isinstance(planned, bool) or planned < 0:
            raise ValueError(f"{where}.memory_planned_bytes: expected a byte count, got {planned!r}")
        try:
            return cls(inventory_from_json([row])[0], backend, planned)
        except ValueError as e:
            raise ValueError(str(e).replace("gpus[0]", where, 1)) from None
