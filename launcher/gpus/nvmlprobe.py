"""Raw NVML answers for every card: the one place that calls NVML functions.

`read_nvml_facts(nvml)` asks NVML everything discovery needs and returns plain JSON-able facts; an
answer NVML refuses (not supported on this card, no permission, an old driver without the function)
is recorded under the device's `"errors"` instead of failing. The same facts are the recorded GPU
inventories in tests/fixtures/gpus/ (`python -m launcher.gpus --record`), which the tests' fake
NVML answers from, so a recording from a real rig replays exactly.

`nvml` is the `pynvml` module (launcher.gpus imports it; nothing else does) or a stand-in with
the same functions, constants and `NVMLError`.

Facts, per device (keys absent when NVML refused; see `"errors"`):
    index, name, uuid, pci_bus_id, memory {total, free, used} (bytes), cuda_compute_capability [major, minor],
    multiprocessor_count, num_gpu_cores, max_clock_sm_mhz, boost_clock_sm_mhz, max_clock_mem_mhz,
    memory_bus_width_bits, max_pcie_link_generation, max_pcie_link_width, curr_pcie_link_generation,
    curr_pcie_link_width, temperature_c, power_usage_mw, utilization_gpu_pct, mig_mode (0/1),
    max_mig_device_count, mig_devices [{slot, uuid, name, memory, multiprocessor_count,
    gpu_instance_slice_count, compute_instance_slice_count, memory_size_mb, gpu_instance_id,
    compute_instance_id}], nvlinks [{active, remote_pci_bus_id, remote_device_type}] (one per link),
    errors {fact: NVML error name such as "NOT_SUPPORTED"}.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

Facts = dict[str, Any]

# NVML's link loop bound; the real count is where NvLinkState starts answering INVALID_ARGUMENT.
_FALLBACK_MAX_LINKS = 18


class NvmlCallFailed(Exception):
    """An NVML call every caller needs (init, device count) failed; carries the NVML error name."""

    def __init__(self, call: str, error_name: str, message: str) -> None:
        super().__init__(f"{call}: {message}")
        self.call = call
        self.error_name = error_name
        self.message = message


def nvml_error_name(nvml: Any, exc: BaseException) -> str:
    """The NVML_ERROR_* name of an NVMLError ("NOT_SUPPORTED"), or "UNKNOWN"."""
    value = getattr(exc, "value", None)
    for attr in dir(nvml):
        if attr.startswith("NVML_ERROR_") and getattr(nvml, attr) == value:
            return attr.removeprefix("NVML_ERROR_")
    return "UNKNOWN"


class _Asker:
    """Calls NVML functions, filing each refusal under the facts' "errors" by fact name."""

    def __init__(self, nvml: Any) -> None:
        self.nvml = nvml

    def ask(self, facts: Facts, fact: str, function: str, *args: Any, convert: Callable[[Any], Any] = int) -> bool:
        call = getattr(self.nvml, function, None)
        if call is None:  # an old pynvml without this binding
            facts.setdefault("errors", {})[fact] = "FUNCTION_NOT_FOUND"
            return False
        try:
            facts[fact] = convert(call(*args))
        except self.nvml.NVMLError as exc:
            facts.setdefault("errors", {})[fact] = nvml_error_name(self.nvml, exc)
            return False
        return True

    def try_call(self, function: str, *args: Any) -> tuple[Any, str | None]:
        """(answer, None) or (None, error name)."""
        call = getattr(self.nvml, function, None)
        if call is None:
            return None, "FUNCTION_NOT_FOUND"
        try:
            return call(*args), None
        except self.nvml.NVMLError as exc:
            return None, nvml_error_name(self.nvml, exc)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _memory(info: Any) -> dict[str, int]:
    return {"total": int(info.total), "free": int(info.free), "used": int(info.used)}


def _identity(asker: _Asker, facts: Facts, handle: Any) -> None:
    asker.ask(facts, "uuid", "nvmlDeviceGetUUID", handle, convert=_text)
    asker.ask(facts, "name", "nvmlDeviceGetName", handle, convert=_text)
    asker.ask(facts, "memory", "nvmlDeviceGetMemoryInfo", handle, convert=_memory)


def _attributes(asker: _Asker, facts: Facts, handle: Any, *, mig: bool) -> None:
    attributes, error = asker.try_call("nvmlDeviceGetAttributes", handle)
    if error is not None:
        facts.setdefault("errors", {})["multiprocessor_count"] = error
        return
    facts["multiprocessor_count"] = int(attributes.multiprocessorCount)
    if mig:  # slice counts and memory size only mean something for a MIG instance
        facts["gpu_instance_slice_count"] = int(attributes.gpuInstanceSliceCount)
        facts["compute_instance_slice_count"] = int(attributes.computeInstanceSliceCount)
        facts["memory_size_mb"] = int(attributes.memorySizeMB)


def _nvlinks(asker: _Asker, facts: Facts, handle: Any) -> None:
    nvml = asker.nvml
    links: list[Facts] = []
    for link in range(int(getattr(nvml, "NVML_NVLINK_MAX_LINKS", _FALLBACK_MAX_LINKS))):
        state, error = asker.try_call("nvmlDeviceGetNvLinkState", handle, link)
        if error is not None:
            # INVALID_ARGUMENT past the card's last link; NOT_SUPPORTED on cards without NVLink.
            if error not in {"INVALID_ARGUMENT", "NOT_SUPPORTED"} or not links:
                facts.setdefault("errors", {})["nvlinks"] = error
            break
        entry: Facts = {"active": bool(state)}
        if state:
            asker.ask(entry, "remote_pci_bus_id", "nvmlDeviceGetNvLinkRemotePciInfo", handle, link, convert=_bus_id)
            asker.ask(entry, "remote_device_type", "nvmlDeviceGetNvLinkRemoteDeviceType", handle, link)
        links.append(entry)
    if links:
        facts["nvlinks"] = links


def _bus_id(pci: Any) -> str:
    return _text(pci.busId)


def _mig_devices(asker: _Asker, facts: Facts, handle: Any) -> None:
    if not asker.ask(facts, "max_mig_device_count", "nvmlDeviceGetMaxMigDeviceCount", handle):
        return
    instances: list[Facts] = []
    for slot in range(facts["max_mig_device_count"]):
        mig_handle, error = asker.try_call("nvmlDeviceGetMigDeviceHandleByIndex", handle, slot)
        if error == "NOT_FOUND":  # an empty slot: no compute instance there
            continue
        mig: Facts = {"slot": slot}
        if error is not None:
            mig["errors"] = {"handle": error}
        else:
            _identity(asker, mig, mig_handle)
            _attributes(asker, mig, mig_handle, mig=True)
            asker.ask(mig, "gpu_instance_id", "nvmlDeviceGetGpuInstanceId", mig_handle)
            asker.ask(mig, "compute_instance_id", "nvmlDeviceGetComputeInstanceId", mig_handle)
        instances.append(mig)
    facts["mig_devices"] = instances


def _device_facts(asker: _Asker, index: int) -> Facts:
    nvml = asker.nvml
    facts: Facts = {"index": index}
    handle, error = asker.try_call("nvmlDeviceGetHandleByIndex", index)
    if error is not None:
        facts["errors"] = {"handle": error}
        return facts
    _identity(asker, facts, handle)
    asker.ask(facts, "pci_bus_id", "nvmlDeviceGetPciInfo", handle, convert=_bus_id)
    asker.ask(facts, "cuda_compute_capability", "nvmlDeviceGetCudaComputeCapability", handle, convert=list)
    _attributes(asker, facts, handle, mig=False)
    asker.ask(facts, "num_gpu_cores", "nvmlDeviceGetNumGpuCores", handle)
    asker.ask(facts, "max_clock_sm_mhz", "nvmlDeviceGetMaxClockInfo", handle, nvml.NVML_CLOCK_SM)
    asker.ask(facts, "boost_clock_sm_mhz", "nvmlDeviceGetMaxCustomerBoostClock", handle, nvml.NVML_CLOCK_SM)
    asker.ask(facts, "max_clock_mem_mhz", "nvmlDeviceGetMaxClockInfo", handle, nvml.NVML_CLOCK_MEM)
    asker.ask(facts, "memory_bus_width_bits", "nvmlDeviceGetMemoryBusWidth", handle)
    asker.ask(facts, "max_pcie_link_generation", "nvmlDeviceGetMaxPcieLinkGeneration", handle)
    asker.ask(facts, "max_pcie_link_width", "nvmlDeviceGetMaxPcieLinkWidth", handle)
    asker.ask(facts, "curr_pcie_link_generation", "nvmlDeviceGetCurrPcieLinkGeneration", handle)
    asker.ask(facts, "curr_pcie_link_width", "nvmlDeviceGetCurrPcieLinkWidth", handle)
    asker.ask(facts, "temperature_c", "nvmlDeviceGetTemperature", handle, nvml.NVML_TEMPERATURE_GPU)
    asker.ask(facts, "power_usage_mw", "nvmlDeviceGetPowerUsage", handle)
    asker.ask(facts, "utilization_gpu_pct", "nvmlDeviceGetUtilizationRates", handle, convert=lambda u: int(u.gpu))
    _nvlinks(asker, facts, handle)
    mig_known = asker.ask(facts, "mig_mode", "nvmlDeviceGetMigMode", handle, convert=lambda modes: int(modes[0]))
    if mig_known and facts["mig_mode"] == 1:
        _mig_devices(asker, facts, handle)
    return facts


def read_nvml_facts(nvml: Any) -> Facts:
    """Initialise NVML, read every device's facts, shut NVML down. Raises NvmlCallFailed.

    Only nvmlInit and nvmlDeviceGetCount failing is fatal; everything else is recorded per device.
    """
    asker = _Asker(nvml)
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        raise NvmlCallFailed("nvmlInit", nvml_error_name(nvml, exc), str(exc)) from exc
    try:
        facts: Facts = {}
        asker.ask(facts, "driver_version", "nvmlSystemGetDriverVersion", convert=_text)
        asker.ask(facts, "cuda_driver_version", "nvmlSystemGetCudaDriverVersion")
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as exc:
            raise NvmlCallFailed("nvmlDeviceGetCount", nvml_error_name(nvml, exc), str(exc)) from exc
        facts["devices"] = [_device_facts(asker, index) for index in range(count)]
        return facts
    finally:
        with contextlib.suppress(nvml.NVMLError):  # a failed shutdown changes nothing: the facts are read
            nvml.nvmlShutdown()
