"""CUDA_VISIBLE_DEVICES, applied to a discovered inventory the way the CUDA runtime applies it.

The CUDA programming guide ("CUDA Environment Variables"): unset -> every device; set but empty -> no
device; otherwise a comma-separated list of integer indices (nvidia-smi's numbering, which is NVML's),
GPU UUIDs or unique prefixes of them ("GPU-8932f937"), and MIG devices ("MIG-<uuid>", or the older
"MIG-GPU-<uuid>/<GPU instance>/<compute instance>"). Devices come out in the order listed; the first
entry that names no device (a bad index such as -1, an unknown or ambiguous UUID) hides itself and
every entry after it: "0,2,-1,1" shows devices 0 and 2.

Where the guide is silent we choose, and say so here: a repeated entry is ignored; matching is
case-insensitive; naming a MIG-enabled GPU (by index or UUID) selects its first MIG instance, since a
CUDA process uses one MIG instance and never the parent GPU. The guide's "only single MIG instance
enumeration" limits one process; this list is the launcher's pool, and each backend gets one instance.
Indices follow NVML/PCI order: the runtime agrees only under CUDA_DEVICE_ORDER=PCI_BUS_ID, so backends
are started with UUIDs, which mean the same thing to everyone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from launcher.facts.gpuinfo import GpuInfo

_INDEX = re.compile(r"^\d+$")
_LEGACY_MIG = re.compile(r"^MIG-(GPU-[0-9a-f-]+)/(\d+)/(\d+)$", re.IGNORECASE)


def _first_instance_of(parent_uuid: str, gpus: Sequence[GpuInfo]) -> GpuInfo | None:
    return next((g for g in gpus if g.mig_parent_uuid == parent_uuid), None)


def _by_gpu_prefix(prefix: str, gpus: Sequence[GpuInfo]) -> GpuInfo | None:
    """The one physical GPU whose UUID starts with `prefix`; None when none or several do."""
    physical = {g.mig_parent_uuid or g.uuid for g in gpus}
    matches = [uuid for uuid in physical if uuid.lower().startswith(prefix)]
    if len(matches) != 1:
        return None
    return next((g for g in gpus if g.uuid == matches[0]), None) or _first_instance_of(matches[0], gpus)


def _resolve(entry: str, gpus: Sequence[GpuInfo]) -> GpuInfo | None:
    token = entry.strip().lower()
    if _INDEX.match(token):
        index = int(token)
        whole = next((g for g in gpus if g.index == index and g.mig_parent_uuid is None), None)
        if whole is not None:
            return whole
        return next((g for g in gpus if g.index == index), None)  # a MIG parent: its first instance
    if token.startswith("gpu-"):
        return _by_gpu_prefix(token, gpus)
    legacy = _LEGACY_MIG.match(token)
    if legacy:
        parent, gpu_instance, compute_instance = legacy.group(1), legacy.group(2), legacy.group(3)
        return next(
            (
                g
                for g in gpus
                if (g.mig_parent_uuid or "").lower() == parent
                and g.extra.get("mig_gpu_instance_id") == gpu_instance
                and g.extra.get("mig_compute_instance_id") == compute_instance
            ),
            None,
        )
    if token.startswith("mig-"):
        matches = [g for g in gpus if g.mig_parent_uuid is not None and g.uuid.lower().startswith(token)]
        return matches[0] if len(matches) == 1 else None
    return None


def apply_visible_devices(gpus: Sequence[GpuInfo], visible_devices: str | None) -> list[GpuInfo]:
    """The devices a CUDA process would see with CUDA_VISIBLE_DEVICES=`visible_devices`, in its order.

    `None` means the variable is unset (every device, in inventory order).
    """
    if visible_devices is None:
        return list(gpus)
    chosen: list[GpuInfo] = []
    for entry in visible_devices.split(","):
        gpu = _resolve(entry, gpus)
        if gpu is None:
            break
        if all(seen.uuid != gpu.uuid for seen in chosen):
            chosen.append(gpu)
    return chosen
