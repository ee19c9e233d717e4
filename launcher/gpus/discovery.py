"""GPU inventory: what the planner knows about each card. The only module that imports pynvml.

`GpuInfo` is the inventory row. `simulated_inventory` builds one from the config's `[sim]` section;
`discover` asks NVML (through `launcher.gpus.nvmlprobe`), honouring CUDA_VISIBLE_DEVICES like the CUDA
runtime does (`launcher.gpus.cudavisible`). `inventory_to_json` / `inventory_from_json` carry an inventory
through the state store and `corral status`. `python -m launcher.gpus` prints what NVML sees
(`--json`, or `--record` for a raw recording that becomes a test fixture).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from launcher.config import SimGpu
from launcher.facts.cards import CardSpec, find_card
from launcher.facts.gpuinfo import GpuInfo, card_from_json, card_to_json, inventory_from_json, inventory_to_json
from launcher.gpus.cudavisible import apply_visible_devices
from launcher.gpus.gpuspec import NvmlCardFacts, card_from_nvml, mig_card, sm_count_from_cores
from launcher.gpus.nvmlprobe import Facts, NvmlCallFailed, read_nvml_facts

__all__ = [
    "GpuInfo",
    "NvmlUnavailable",
    "card_from_json",
    "card_to_json",
    "discover",
    "inventory_from_facts",
    "inventory_from_json",
    "inventory_to_json",
    "load_nvml",
    "read_facts",
    "sim_uuid",
    "simulated_card",
    "simulated_inventory",
]

log = logging.getLogger(__name__)


class NvmlUnavailable(RuntimeError):
    """NVML cannot be used here (no package, no driver, driver not loaded, or NVML failing).

    The message is one sentence for a human; the caller falls back to the simulated rig or fails
    when the config demands real GPUs.
    """


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


# ---------------------------------------------------------------------------------------------- NVML

# Why NVML refused to start, in words an operator can act on.
_INIT_FAILURES = {
    "LIBRARY_NOT_FOUND": "no NVIDIA driver is installed (libnvidia-ml.so.1 not found)",
    "DRIVER_NOT_LOADED": "the NVIDIA kernel driver is not loaded",
    "LIB_RM_VERSION_MISMATCH": "the NVIDIA driver was upgraded but the old kernel module is still loaded; reboot",
    "NO_PERMISSION": "this user may not open the NVIDIA devices",
}
_NVLINK_TO_GPU, _NVLINK_TO_SWITCH = 0, 2  # nvmlIntNvLinkDeviceType_t


def load_nvml() -> Any:
    """The pynvml module (from nvidia-ml-py). Raises NvmlUnavailable when it is not installed."""
    try:
        import pynvml
    except ImportError:
        raise NvmlUnavailable("the nvidia-ml-py package (pynvml) is not installed") from None
    return pynvml


def _bus_key(bus_id: str) -> tuple[int, ...] | None:
    """ "00000000:18:00.0" and the legacy "0000:18:00.0" name the same device."""
    try:
        domain, bus, rest = bus_id.strip().split(":")
        device, function = rest.split(".")
        return int(domain, 16), int(bus, 16), int(device, 16), int(function, 16)
    except ValueError:
        return None


def _nvlink_peers(devices: Sequence[Facts]) -> dict[str, tuple[str, ...]]:
    """UUID -> NVLink peer UUIDs. Cards whose links end on NVSwitches all reach each other."""
    uuid_by_bus: dict[tuple[int, ...], str] = {}
    for d in devices:
        key = _bus_key(d.get("pci_bus_id", ""))
        if key is not None and "uuid" in d:
            uuid_by_bus[key] = d["uuid"]
    direct: dict[str, set[str]] = {}
    on_switch: list[str] = []
    for device in devices:
        uuid = device.get("uuid")
        if uuid is None:
            continue
        direct[uuid] = set()
        for link in device.get("nvlinks", []):
            if not link.get("active"):
                continue
            remote_key = _bus_key(link.get("remote_pci_bus_id", ""))
            remote = None if remote_key is None else uuid_by_bus.get(remote_key)
            kind = link.get("remote_device_type")
            # Without the device type (old drivers), a far end that is none of our GPUs is a switch port.
            if kind == _NVLINK_TO_GPU or (kind is None and remote is not None):
                if remote is not None and remote != uuid:
                    direct[uuid].add(remote)
            elif (kind == _NVLINK_TO_SWITCH or kind is None) and uuid not in on_switch:
                on_switch.append(uuid)
    order = [d["uuid"] for d in devices if "uuid" in d]
    peers = {}
    for uuid, reachable in direct.items():
        if uuid in on_switch:
            reachable = reachable | set(on_switch)
        peers[uuid] = tuple(u for u in order if u in reachable and u != uuid)
    return peers


def _card_facts(device: Facts, memory_total_bytes: int) -> NvmlCardFacts:
    cc = tuple(device.get("cuda_compute_capability", (0, 0)))
    compute_capability = (int(cc[0]), int(cc[1])) if len(cc) == 2 else (0, 0)
    sm_count = device.get("multiprocessor_count") or sm_count_from_cores(
        device.get("num_gpu_cores", 0), compute_capability
    )
    return NvmlCardFacts(
        name=device["name"],
        memory_total_bytes=memory_total_bytes,
        compute_capability=compute_capability,
        sm_count=sm_count,
        sm_clock_mhz=device.get("max_clock_sm_mhz", 0),
        sm_boost_clock_mhz=device.get("boost_clock_sm_mhz", 0),
        mem_clock_mhz=device.get("max_clock_mem_mhz", 0),
        mem_bus_width_bits=device.get("memory_bus_width_bits", 0),
    )


def _whole_gpu(device: Facts, peers: tuple[str, ...]) -> GpuInfo:
    memory = device["memory"]
    facts = _card_facts(device, memory["total"])
    card, extra = card_from_nvml(facts)
    power_mw = device.get("power_usage_mw")
    return GpuInfo(
        index=device["index"],
        uuid=device["uuid"],
        name=device["name"],
        memory_total_bytes=memory["total"],
        memory_free_bytes=memory["free"],
        memory_used_bytes=memory["used"],
        card=card,
        compute_capability=facts.compute_capability,
        sm_count=facts.sm_count,
        sm_clock_mhz=facts.sm_clock_mhz,
        mem_clock_mhz=facts.mem_clock_mhz,
        mem_bus_width_bits=facts.mem_bus_width_bits,
        # The link as built; the current one drops to gen 1 while the card idles.
        pcie_gen=device.get("max_pcie_link_generation") or device.get("curr_pcie_link_generation", 0),
        pcie_width=device.get("max_pcie_link_width") or device.get("curr_pcie_link_width", 0),
        nvlink_peers=peers,
        temperature_c=device.get("temperature_c"),
        power_w=None if power_mw is None else power_mw / 1000,
        utilization_pct=device.get("utilization_gpu_pct"),
        extra=extra,
        pci_bus_id=device.get("pci_bus_id", ""),
    )


def _mig_instances(device: Facts, parent: GpuInfo) -> list[GpuInfo]:
    instances = []
    for mig in device.get("mig_devices", []):
        if not {"uuid", "name", "memory"} <= mig.keys():
            log.warning(
                "GPU %d: MIG slot %s unreadable (%s); skipped", parent.index, mig.get("slot"), mig.get("errors")
            )
            continue
        memory = mig["memory"]
        sm_count = mig.get("multiprocessor_count", 0)
        if parent.sm_count and sm_count:
            sm_share = sm_count / parent.sm_count
        else:  # 7 compute slices on every MIG-capable card so far
            sm_share = mig.get("gpu_instance_slice_count", 1) / 7
        card, extra = mig_card(
            parent.card, mig["name"], memory["total"], sm_share, memory["total"] / parent.memory_total_bytes
        )
        extra |= {"mig_slot": str(mig["slot"])}
        for key in ("gpu_instance_id", "compute_instance_id"):
            if key in mig:
                extra[f"mig_{key}"] = str(mig[key])
        instances.append(
            GpuInfo(
                index=parent.index,
                uuid=mig["uuid"],
                name=mig["name"],
                memory_total_bytes=memory["total"],
                memory_free_bytes=memory["free"],
                memory_used_bytes=memory["used"],
                card=card,
                compute_capability=parent.compute_capability,
                sm_count=sm_count,
                sm_clock_mhz=parent.sm_clock_mhz,
                mem_clock_mhz=parent.mem_clock_mhz,
                mem_bus_width_bits=parent.mem_bus_width_bits,
                pcie_gen=parent.pcie_gen,
                pcie_width=parent.pcie_width,
                temperature_c=parent.temperature_c,  # board sensors: shared by every instance
                power_w=parent.power_w,
                mig_enabled=True,
                extra=extra,
                pci_bus_id=parent.pci_bus_id,
                mig_parent_uuid=parent.uuid,
            )
        )
    return instances


def inventory_from_facts(facts: Facts) -> list[GpuInfo]:
    """Every usable device in NVML's facts: whole GPUs, and the MIG instances of MIG-enabled GPUs.

    A card whose identity or memory NVML cannot read is left out with a warning (CUDA could not use
    it either); a MIG-enabled card stands for its instances, never for itself.
    """
    devices = facts.get("devices", [])
    peers = _nvlink_peers(devices)
    inventory: list[GpuInfo] = []
    for device in devices:
        if not {"uuid", "name", "memory"} <= device.keys():
            log.warning("GPU %d unreadable through NVML (%s); left out", device["index"], device.get("errors"))
            continue
        gpu = _whole_gpu(device, peers.get(device["uuid"], ()))
        if device.get("mig_mode") == 1:
            instances = _mig_instances(device, gpu)
            if not instances:
                log.warning("GPU %d (%s) has MIG enabled but no MIG instance; left out", gpu.index, gpu.name)
            inventory.extend(instances)
        else:
            inventory.append(gpu)
    return inventory


def discover(visible_devices: str | None = None, nvml: Any = None) -> list[GpuInfo]:
    """The GPUs NVML sees, as CUDA_VISIBLE_DEVICES=`visible_devices` would show them (None: all).

    `nvml` defaults to the pynvml module; tests pass a fake. Unsupported per-card queries leave
    their fields empty. Raises NvmlUnavailable when NVML is missing or cannot start. NVML is shut
    down again before returning. NVLink peers outside the visible set are dropped.
    """
    facts = read_facts(nvml)
    gpus = apply_visible_devices(inventory_from_facts(facts), visible_devices)
    visible = {g.uuid for g in gpus}
    return [
        g
        if set(g.nvlink_peers) <= visible
        else replace(g, nvlink_peers=tuple(p for p in g.nvlink_peers if p in visible))
        for g in gpus
    ]


def read_facts(nvml: Any = None) -> Facts:
    """NVML's raw facts (see launcher.gpus.nvmlprobe). Raises NvmlUnavailable."""
    nvml = load_nvml() if nvml is None else nvml
    try:
        return read_nvml_facts(nvml)
    except NvmlCallFailed as exc:
        reason = _INIT_FAILURES.get(exc.error_name)
        if exc.call == "nvmlInit" and reason:
            raise NvmlUnavailable(reason) from exc
        raise NvmlUnavailable(f"NVML failed in {exc.call}: {exc.message}") from exc


# ------------------------------------------------------------------------------------------------- CLI


def _table(gpus: Sequence[GpuInfo]) -> str:
    header = (
        "#",
        "name",
        "memory GiB (free)",
        "BW GB/s",
        "FP16 TF",
        "CC",
        "PCIe",
        "NVLink",
        "temp",
        "power",
        "util",
        "uuid",
    )
    lines = [header]
    for gpu in gpus:
        lines.append(
            (
                str(gpu.index),
                gpu.name,
                f"{gpu.memory_total_bytes / 2**30:.1f} ({gpu.memory_free_bytes / 2**30:.1f})",
                f"{gpu.card.mem_bw_gbps:.0f}",
                f"{gpu.card.fp16_tflops:.0f}",
                "{}.{}".format(*gpu.compute_capability),
                f"gen{gpu.pcie_gen} x{gpu.pcie_width}" if gpu.pcie_gen else "-",
                f"{len(gpu.nvlink_peers)} peers" if gpu.nvlink_peers else "-",
                "-" if gpu.temperature_c is None else f"{gpu.temperature_c}C",
                "-" if gpu.power_w is None else f"{gpu.power_w:.0f}W",
                "-" if gpu.utilization_pct is None else f"{gpu.utilization_pct}%",
                gpu.uuid,
            )
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in lines]
    notes = [f"  GPU {g.index} {g.name}: {g.extra['card_spec_note']}" for g in gpus if "card_spec_note" in g.extra]
    return "\n".join(text + notes)


def main(argv: Sequence[str] | None = None, nvml: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher.gpus", description="Show the GPUs NVML discovers.")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the inventory as JSON")
    output.add_argument("--record", action="store_true", help="print NVML's raw answers (a tests/fixtures/gpus file)")
    parser.add_argument(
        "--visible-devices",
        default=os.environ.get("CUDA_VISIBLE_DEVICES"),
        help="as CUDA_VISIBLE_DEVICES (default: that variable)",
    )
    args = parser.parse_args(argv)
    try:
        if args.record:
            facts = read_facts(nvml)
            print(json.dumps({"description": "recorded with python -m launcher.gpus --record", **facts}, indent=2))
            return 0
        gpus = discover(args.visible_devices, nvml)
    except NvmlUnavailable as exc:
        print(f"gpus: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(inventory_to_json(gpus), indent=2))
    elif gpus:
        print(_table(gpus))
    else:
        print(
            "no GPU visible"
            + ("" if args.visible_devices is None else f" (CUDA_VISIBLE_DEVICES={args.visible_devices!r})")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
