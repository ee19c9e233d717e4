"""A fake `pynvml` that answers from a recorded GPU inventory (tests/fixtures/gpus/*.json).

A fixture holds NVML's raw answers per device in launcher.gpus.nvmlprobe's format (what
`python -m launcher.gpus --record` prints on a real rig). The fake implements the pynvml functions
discovery calls, with pynvml's constants and error classes, and refuses like NVML does: a fact the
fixture lists under a device's "errors" raises that NVML error; a fact it lacks raises NOT_SUPPORTED;
a link past the last NVLink raises INVALID_ARGUMENT; an empty MIG slot raises NOT_FOUND; a call
before nvmlInit raises UNINITIALIZED. Top-level "init_error" / "count_error" make those calls fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, ClassVar

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "gpus"

# pynvml's constants (nvml.h numbering).
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_UNKNOWN = 999
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_TEMPERATURE_GPU = 0
NVML_NVLINK_MAX_LINKS = 18
NVML_DEVICE_MIG_ENABLE = 1

_MESSAGES = {
    NVML_ERROR_UNINITIALIZED: "Uninitialized",
    NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
    NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
    NVML_ERROR_NOT_FOUND: "Not Found",
    NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
    NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
    NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
    NVML_ERROR_GPU_IS_LOST: "GPU is lost",
    NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
    NVML_ERROR_UNKNOWN: "Unknown Error",
}


class NVMLError(Exception):
    """pynvml's base error: `NVMLError(code)` builds the subclass for that code, `.value` is the code."""

    _by_code: ClassVar[dict[int, type[NVMLError]]] = {}
    value: int

    def __new__(cls, value: int) -> NVMLError:  # a factory, like pynvml's: the subclass for the code
        if cls is NVMLError:
            cls = NVMLError._by_code.get(value, cls)
        error = Exception.__new__(cls)
        error.value = value
        return error

    def __init__(self, value: int) -> None:
        super().__init__(value)

    def __str__(self) -> str:
        return _MESSAGES.get(self.value, f"NVML error {self.value}")


def _error_class(name: str, code: int) -> type[NVMLError]:
    cls = type(name, (NVMLError,), {})
    NVMLError._by_code[code] = cls
    return cls


NVMLError_Uninitialized = _error_class("NVMLError_Uninitialized", NVML_ERROR_UNINITIALIZED)
NVMLError_InvalidArgument = _error_class("NVMLError_InvalidArgument", NVML_ERROR_INVALID_ARGUMENT)
NVMLError_NotSupported = _error_class("NVMLError_NotSupported", NVML_ERROR_NOT_SUPPORTED)
NVMLError_NoPermission = _error_class("NVMLError_NoPermission", NVML_ERROR_NO_PERMISSION)
NVMLError_NotFound = _error_class("NVMLError_NotFound", NVML_ERROR_NOT_FOUND)
NVMLError_DriverNotLoaded = _error_class("NVMLError_DriverNotLoaded", NVML_ERROR_DRIVER_NOT_LOADED)
NVMLError_LibraryNotFound = _error_class("NVMLError_LibraryNotFound", NVML_ERROR_LIBRARY_NOT_FOUND)
NVMLError_FunctionNotFound = _error_class("NVMLError_FunctionNotFound", NVML_ERROR_FUNCTION_NOT_FOUND)
NVMLError_GpuIsLost = _error_class("NVMLError_GpuIsLost", NVML_ERROR_GPU_IS_LOST)
NVMLError_Unknown = _error_class("NVMLError_Unknown", NVML_ERROR_UNKNOWN)


def _code(error_name: str) -> int:
    return int(globals()[f"NVML_ERROR_{error_name}"])


class _Handle:
    """An opaque nvmlDevice_t: a whole GPU's facts, or a MIG instance's (with its parent)."""

    def __init__(self, facts: dict[str, Any], parent: _Handle | None = None) -> None:
        self.facts = facts
        self.parent = parent


class FakeNvml:
    """Module-like stand-in for pynvml over one fixture. `calls` counts every NVML call made."""

    def __init__(self, fixture: dict[str, Any]) -> None:
        self.fixture = fixture
        self.initialized = False
        self.init_count = 0
        self.shutdown_count = 0
        self.calls = 0
        for name, value in globals().items():  # constants and error classes, like the module has
            if name.startswith(("NVML_", "NVMLError")):
                setattr(self, name, value)

    @classmethod
    def from_fixture(cls, name: str) -> FakeNvml:
        return cls(load_fixture(name))

    # -- plumbing

    def _ready(self) -> None:
        self.calls += 1
        if not self.initialized:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _fact(self, handle: _Handle, fact: str) -> Any:
        self._ready()
        error = handle.facts.get("errors", {}).get(fact)
        if error is not None:
            raise NVMLError(_code(error))
        if fact not in handle.facts:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return handle.facts[fact]

    def _link(self, handle: _Handle, link: int) -> dict[str, Any]:
        links = self._fact(handle, "nvlinks")
        if not 0 <= link < len(links):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        entry: dict[str, Any] = links[link]
        return entry

    # -- library

    def nvmlInit(self) -> None:
        self.calls += 1
        if "init_error" in self.fixture:
            raise NVMLError(_code(self.fixture["init_error"]))
        self.initialized = True
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._ready()
        self.initialized = False
        self.shutdown_count += 1

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self._fact(_Handle(self.fixture), "driver_version"))

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return int(self._fact(_Handle(self.fixture), "cuda_driver_version"))

    def nvmlDeviceGetCount(self) -> int:
        self._ready()
        if "count_error" in self.fixture:
            raise NVMLError(_code(self.fixture["count_error"]))
        return len(self.fixture["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> _Handle:
        self._ready()
        devices = self.fixture["devices"]
        if not 0 <= index < len(devices):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        handle = _Handle(devices[index])
        if "handle" in handle.facts.get("errors", {}):
            raise NVMLError(_code(handle.facts["errors"]["handle"]))
        return handle

    # -- per device

    def nvmlDeviceGetName(self, handle: _Handle) -> str:
        return str(self._fact(handle, "name"))

    def nvmlDeviceGetUUID(self, handle: _Handle) -> str:
        return str(self._fact(handle, "uuid"))

    def nvmlDeviceGetPciInfo(self, handle: _Handle) -> SimpleNamespace:
        bus_id = self._fact(handle, "pci_bus_id")
        return SimpleNamespace(busId=bus_id, busIdLegacy=bus_id[4:])

    def nvmlDeviceGetMemoryInfo(self, handle: _Handle) -> SimpleNamespace:
        return SimpleNamespace(**self._fact(handle, "memory"))

    def nvmlDeviceGetCudaComputeCapability(self, handle: _Handle) -> tuple[int, int]:
        major, minor = self._fact(handle, "cuda_compute_capability")
        return int(major), int(minor)

    def nvmlDeviceGetAttributes(self, handle: _Handle) -> SimpleNamespace:
        facts = handle.facts
        return SimpleNamespace(
            multiprocessorCount=self._fact(handle, "multiprocessor_count"),
            sharedCopyEngineCount=0,
            sharedDecoderCount=0,
            sharedEncoderCount=0,
            sharedJpegCount=0,
            sharedOfaCount=0,
            gpuInstanceSliceCount=facts.get("gpu_instance_slice_count", 0),
            computeInstanceSliceCount=facts.get("compute_instance_slice_count", 0),
            memorySizeMB=facts.get("memory_size_mb", 0),
        )

    def nvmlDeviceGetNumGpuCores(self, handle: _Handle) -> int:
        return int(self._fact(handle, "num_gpu_cores"))

    def nvmlDeviceGetMaxClockInfo(self, handle: _Handle, clock_type: int) -> int:
        fact = {NVML_CLOCK_SM: "max_clock_sm_mhz", NVML_CLOCK_MEM: "max_clock_mem_mhz"}.get(clock_type, "?")
        return int(self._fact(handle, fact))

    def nvmlDeviceGetMaxCustomerBoostClock(self, handle: _Handle, clock_type: int) -> int:
        return int(self._fact(handle, "boost_clock_sm_mhz" if clock_type == NVML_CLOCK_SM else "?"))

    def nvmlDeviceGetMemoryBusWidth(self, handle: _Handle) -> int:
        return int(self._fact(handle, "memory_bus_width_bits"))

    def nvmlDeviceGetMaxPcieLinkGeneration(self, handle: _Handle) -> int:
        return int(self._fact(handle, "max_pcie_link_generation"))

    def nvmlDeviceGetMaxPcieLinkWidth(self, handle: _Handle) -> int:
        return int(self._fact(handle, "max_pcie_link_width"))

    def nvmlDeviceGetCurrPcieLinkGeneration(self, handle: _Handle) -> int:
        return int(self._fact(handle, "curr_pcie_link_generation"))

    def nvmlDeviceGetCurrPcieLinkWidth(self, handle: _Handle) -> int:
        return int(self._fact(handle, "curr_pcie_link_width"))

    def nvmlDeviceGetTemperature(self, handle: _Handle, sensor: int) -> int:
        return int(self._fact(handle, "temperature_c" if sensor == NVML_TEMPERATURE_GPU else "?"))

    def nvmlDeviceGetPowerUsage(self, handle: _Handle) -> int:
        return int(self._fact(handle, "power_usage_mw"))

    def nvmlDeviceGetUtilizationRates(self, handle: _Handle) -> SimpleNamespace:
        return SimpleNamespace(gpu=self._fact(handle, "utilization_gpu_pct"), memory=0)

    def nvmlDeviceGetNvLinkState(self, handle: _Handle, link: int) -> int:
        return int(self._link(handle, link)["active"])

    def _link_fact(self, handle: _Handle, link: int, fact: str) -> Any:
        entry = self._link(handle, link)
        error = entry.get("errors", {}).get(fact)
        if error is not None:
            raise NVMLError(_code(error))
        if not entry["active"] or fact not in entry:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return entry[fact]

    def nvmlDeviceGetNvLinkRemotePciInfo(self, handle: _Handle, link: int) -> SimpleNamespace:
        return SimpleNamespace(busId=self._link_fact(handle, link, "remote_pci_bus_id"))

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, handle: _Handle, link: int) -> int:
        return int(self._link_fact(handle, link, "remote_device_type"))

    # -- MIG

    def nvmlDeviceGetMigMode(self, handle: _Handle) -> list[int]:
        mode = int(self._fact(handle, "mig_mode"))
        return [mode, mode]

    def nvmlDeviceGetMaxMigDeviceCount(self, handle: _Handle) -> int:
        return int(self._fact(handle, "max_mig_device_count"))

    def nvmlDeviceGetMigDeviceHandleByIndex(self, handle: _Handle, slot: int) -> _Handle:
        if not 0 <= slot < self.nvmlDeviceGetMaxMigDeviceCount(handle):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        for mig in handle.facts.get("mig_devices", []):
            if mig["slot"] == slot:
                if "handle" in mig.get("errors", {}):
                    raise NVMLError(_code(mig["errors"]["handle"]))
                return _Handle(mig, parent=handle)
        raise NVMLError(NVML_ERROR_NOT_FOUND)

    def nvmlDeviceGetGpuInstanceId(self, handle: _Handle) -> int:
        if handle.parent is None:
            self._ready()
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return int(self._fact(handle, "gpu_instance_id"))

    def nvmlDeviceGetComputeInstanceId(self, handle: _Handle) -> int:
        if handle.parent is None:
            self._ready()
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return int(self._fact(handle, "compute_instance_id"))


def load_fixture(name: str) -> dict[str, Any]:
    """A fixture by file name ("2x-rtx-4090.json" or "2x-rtx-4090")."""
    path = FIXTURES / (name if name.endswith(".json") else f"{name}.json")
    fixture: dict[str, Any] = json.loads(path.read_text())
    return fixture


def fixture_names() -> list[str]:
    return sorted(p.name for p in FIXTURES.glob("*.json"))
