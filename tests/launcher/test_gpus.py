"""GPU discovery over recorded NVML inventories (tests/fixtures/gpus, answered by tests/support/fakenvml.py)."""

from __future__ import annotations

import builtins
import copy
import ctypes.util
import json
import subprocess
import sys
from typing import Any

import pytest

from launcher.config import SimGpu
from launcher.facts.cards import find_card
from launcher.gpus.discovery import (
    GpuInfo,
    NvmlUnavailable,
    discover,
    inventory_from_json,
    inventory_to_json,
    main,
    read_facts,
    simulated_inventory,
)
from tests.support.fakenvml import FakeNvml, fixture_names, load_fixture

GIB = 1024**3
H100_UUIDS = [d["uuid"] for d in load_fixture("8x-h100-nvlink")["devices"]]
A6000_UUIDS = [d["uuid"] for d in load_fixture("4x-a6000")["devices"]]
RTX_UUIDS = [d["uuid"] for d in load_fixture("2x-rtx-4090")["devices"]]


def _discover(fixture: str, visible_devices: str | None = None) -> list[GpuInfo]:
    return discover(visible_devices, nvml=FakeNvml.from_fixture(fixture))


# ------------------------------------------------------------------------------------------ each topology


def test_one_h100() -> None:
    (gpu,) = _discover("1x-h100-80g")
    assert gpu.index == 0
    assert gpu.uuid == "GPU-5e7f7c4a-2b1d-8e36-94c1-0f6a3d2b7e91"
    assert gpu.name == "NVIDIA H100 80GB HBM3"
    assert gpu.memory_total_bytes == 85520809984
    assert gpu.memory_used_bytes == 527 * 2**20
    assert gpu.memory_free_bytes == gpu.memory_total_bytes - gpu.memory_used_bytes
    assert gpu.card.name == "H100 80GB"  # from the table, with the memory NVML reports
    assert gpu.card.vram_bytes == 85520809984
    assert gpu.mem_bw_gbps == 3350
    assert gpu.extra == {"card_spec": "table"}
    assert gpu.compute_capability == (9, 0)
    assert (gpu.sm_count, gpu.sm_clock_mhz, gpu.mem_clock_mhz, gpu.mem_bus_width_bits) == (132, 1980, 2619, 5120)
    assert (gpu.pcie_gen, gpu.pcie_width) == (5, 16)
    assert gpu.nvlink_peers == ()  # links present but inactive
    assert (gpu.temperature_c, gpu.power_w, gpu.utilization_pct) == (31, pytest.approx(71.843), 0)
    assert not gpu.mig_enabled
    assert not gpu.simulated
    assert gpu.pci_bus_id == "00000000:18:00.0"


def test_two_rtx_4090() -> None:
    gpus = _discover("2x-rtx-4090")
    assert [g.uuid for g in gpus] == RTX_UUIDS
    assert [g.name for g in gpus] == ["NVIDIA GeForce RTX 4090"] * 2
    assert [g.memory_total_bytes for g in gpus] == [25757220864] * 2
    assert [g.card.name for g in gpus] == ["RTX 4090"] * 2
    assert [g.mem_bw_gbps for g in gpus] == [1008] * 2
    assert gpus[0].memory_used_bytes == 1042 * 2**20  # the desktop's card
    # The idle link drops to gen 1; the planner wants what the slot can do.
    assert [(g.pcie_gen, g.pcie_width) for g in gpus] == [(4, 16)] * 2
    assert all(g.nvlink_peers == () for g in gpus)


def test_mixed_4090_and_3090() -> None:
    gpus = _discover("rtx-4090-rtx-3090")
    assert [(g.index, g.card.name, g.compute_capability) for g in gpus] == [
        (0, "RTX 4090", (8, 9)),
        (1, "RTX 3090", (8, 6)),
    ]
    assert gpus[1].memory_total_bytes == 25769803776
    assert gpus[0].mem_bw_gbps > gpus[1].mem_bw_gbps
    assert gpus[1].nvlink_peers == ()  # NVLink-capable card without a bridge


def test_four_a6000_in_bridged_pairs() -> None:
    gpus = _discover("4x-a6000")
    assert [g.card.name for g in gpus] == ["A6000"] * 4
    assert [g.nvlink_peers for g in gpus] == [
        (A6000_UUIDS[1],),
        (A6000_UUIDS[0],),
        (A6000_UUIDS[3],),
        (A6000_UUIDS[2],),
    ]


def test_nvlink_peers_on_a_driver_without_remote_device_types() -> None:
    """Old drivers lack nvmlDeviceGetNvLinkRemoteDeviceType: a far end that is one of our GPUs is a GPU."""
    for name, expected in (("4x-a6000", 1), ("8x-h100-nvlink", 7)):
        fixture = load_fixture(name)
        for device in fixture["devices"]:
            for link in device["nvlinks"]:
                del link["remote_device_type"]
                link["errors"] = {"remote_device_type": "FUNCTION_NOT_FOUND"}
        gpus = discover(nvml=FakeNvml(fixture))
        assert [len(g.nvlink_peers) for g in gpus] == [expected] * len(gpus)
        assert gpus == _discover(name)


def test_eight_h100_on_nvswitch_all_reach_each_other() -> None:
    gpus = _discover("8x-h100-nvlink")
    assert [g.index for g in gpus] == list(range(8))
    for gpu in gpus:
        assert gpu.nvlink_peers == tuple(u for u in H100_UUIDS if u != gpu.uuid)
    assert gpus[0].utilization_pct == 97
    assert gpus[0].memory_free_bytes < 20 * GIB < gpus[2].memory_free_bytes


def test_mig_instances_are_the_devices() -> None:
    gpus = _discover("mig-a100")
    parent = load_fixture("mig-a100")["devices"][0]["uuid"]
    assert [g.name for g in gpus] == [
        "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
        "NVIDIA A100-SXM4-80GB MIG 2g.20gb",
        "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
        "NVIDIA A100-SXM4-80GB MIG 1g.10gb",
    ]
    assert all(g.uuid.startswith("MIG-") and g.mig_enabled and g.mig_parent_uuid == parent for g in gpus)
    assert all(g.index == 0 for g in gpus)
    assert [g.memory_total_bytes // 2**20 for g in gpus] == [40192, 19968, 9728, 9728]
    assert [g.sm_count for g in gpus] == [42, 28, 14, 14]
    biggest = gpus[0]
    a100 = find_card("A100 80GB")
    assert a100 is not None
    # A 3g.40gb instance gets about half the memory bandwidth and 42 of 108 SMs.
    assert biggest.card.vram_bytes == 40192 * 2**20
    assert biggest.mem_bw_gbps == pytest.approx(a100.mem_bw_gbps * 40192 / 81920, abs=0.1)
    assert biggest.card.fp16_tflops == pytest.approx(a100.fp16_tflops * 42 / 108, abs=0.1)
    assert biggest.extra["card_spec"] == "mig"
    assert "cannot be grouped" in biggest.extra["card_spec_note"]
    assert (biggest.extra["mig_gpu_instance_id"], biggest.extra["mig_compute_instance_id"]) == ("2", "0")
    assert biggest.utilization_pct is None  # NVML gives none per instance in MIG mode
    assert biggest.temperature_c == 31  # the board's sensor


def test_partial_nvml_answers_leave_fields_empty() -> None:
    gpus = _discover("partial-nvml")
    # GPU 2 fell off the bus: left out; the others keep their NVML indices.
    assert [g.index for g in gpus] == [0, 1, 3]
    old_driver = gpus[1]
    assert old_driver.card.name == "RTX 4090"  # the table still knows it by name
    assert (old_driver.sm_count, old_driver.mem_bus_width_bits) == (0, 0)
    assert old_driver.power_w is None
    assert old_driver.utilization_pct is None  # NO_PERMISSION
    assert old_driver.temperature_c == 34
    assert (old_driver.pcie_gen, old_driver.pcie_width) == (4, 8)  # current link when the max is refused
    vgpu = gpus[2]
    assert (vgpu.sm_clock_mhz, vgpu.mem_clock_mhz, vgpu.pcie_gen) == (0, 0, 0)
    assert vgpu.sm_count == 92


def test_unknown_card_gets_a_spec_computed_from_nvml() -> None:
    card_4070s = _discover("partial-nvml")[0]
    assert find_card(card_4070s.name) is None
    assert card_4070s.card.name == "GeForce RTX 4070 SUPER"
    assert card_4070s.card.aliases == ("NVIDIA GeForce RTX 4070 SUPER",)
    assert card_4070s.card.vram_bytes == 12878086144
    assert card_4070s.mem_bw_gbps == pytest.approx(504.0, abs=0.1)  # 2 x 10501 MHz x 192 bit / 8
    # 7168 CUDA cores / 128 per Ada SM = 56 SMs; no rated boost clock, so the max clock.
    assert card_4070s.sm_count == 56
    assert card_4070s.card.fp16_tflops == pytest.approx(56 * 3105e6 * 1024 / 1e12, abs=0.1)
    assert card_4070s.extra["card_spec"] == "nvml"
    assert "not in the built-in card table" in card_4070s.extra["card_spec_note"]
    assert "10501 MHz x 192-bit bus" in card_4070s.extra["card_spec_note"]

    hidden_clocks = _discover("partial-nvml")[2]
    assert hidden_clocks.card.mem_bw_gbps == 300.0
    assert "bandwidth assumed 300 GB/s" in hidden_clocks.extra["card_spec_note"]


def test_computed_spec_matches_the_table_for_known_cards() -> None:
    """The NVML formulas, run on cards the table knows, land on the table's published figures."""
    fixture = load_fixture("rtx-4090-rtx-3090")
    for device in fixture["devices"]:
        device["name"] = device["name"].replace("GeForce", "Imaginary")  # hide it from the table
    computed = discover(nvml=FakeNvml(fixture))
    assert [g.extra["card_spec"] for g in computed] == ["nvml", "nvml"]
    assert [round(g.mem_bw_gbps) for g in computed] == [1008, 936]
    table = _discover("1x-h100-80g")[0].card
    h100 = load_fixture("1x-h100-80g")
    h100["devices"][0]["name"] = "NVIDIA Hypothetical 80GB HBM3"
    (gpu,) = discover(nvml=FakeNvml(h100))
    assert gpu.mem_bw_gbps == pytest.approx(table.mem_bw_gbps, rel=0.01)
    assert gpu.card.fp16_tflops == pytest.approx(1070, rel=0.01)  # 132 SMs at the 1980 MHz boost


# --------------------------------------------------------------------------------- CUDA_VISIBLE_DEVICES


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [0, 1, 2, 3, 4, 5, 6, 7]),
        ("3", [3]),
        ("5,1,7", [5, 1, 7]),  # listed order, not NVML order
        (" 2 , 0 ", [2, 0]),
        ("0,2,-1,1", [0, 2]),  # the CUDA guide's example: -1 hides itself and what follows
        ("1,8,2", [1]),  # no device 8
        ("1,abc,2", [1]),
        ("", []),  # set but empty: no device
        ("4,4,6", [4, 6]),
        (H100_UUIDS[6], [6]),
        (f"{H100_UUIDS[6]},{H100_UUIDS[2]}", [6, 2]),
        (H100_UUIDS[3][:12], [3]),  # a unique UUID prefix, as CUDA allows
        (H100_UUIDS[3][:12].upper(), [3]),  # our choice: case does not matter
        ("GPU-,0", []),  # a prefix every card shares is ambiguous
        ("0,GPU-00000000", [0]),
        (f"7,{H100_UUIDS[0]},2", [7, 0, 2]),
    ],
)
def test_cuda_visible_devices(visible: str | None, expected: list[int]) -> None:
    assert [g.index for g in _discover("8x-h100-nvlink", visible)] == expected


def test_hidden_cards_are_dropped_from_nvlink_peers() -> None:
    gpus = _discover("8x-h100-nvlink", "4,1")
    assert [g.nvlink_peers for g in gpus] == [(H100_UUIDS[1],), (H100_UUIDS[4],)]
    pair = _discover("4x-a6000", "0,2")
    assert [g.nvlink_peers for g in pair] == [(), ()]


def test_cuda_visible_devices_with_mig() -> None:
    fixture = load_fixture("mig-a100")
    parent = fixture["devices"][0]["uuid"]
    migs = [m["uuid"] for m in fixture["devices"][0]["mig_devices"]]

    def names(visible: str) -> list[str]:
        return [g.uuid for g in discover(visible, nvml=FakeNvml(fixture))]

    assert names(migs[2]) == [migs[2]]
    assert names(f"{migs[3]},{migs[1]}") == [migs[3], migs[1]]
    assert names(migs[1][:10]) == [migs[1]]
    assert names(f"MIG-{parent}/9/0") == [migs[2]]  # the older MIG-GPU-<uuid>/<GI>/<CI> form
    assert names(f"MIG-{parent}/1/0,{migs[0]}") == []  # no GPU instance 1
    # The MIG-enabled GPU itself (by index or UUID) stands for its first instance.
    assert names("0") == [migs[0]]
    assert names(parent[:15]) == [migs[0]]


# ----------------------------------------------------------------------------------------- NVML failures


@pytest.mark.parametrize(
    ("init_error", "message"),
    [
        ("LIBRARY_NOT_FOUND", "no NVIDIA driver is installed"),
        ("DRIVER_NOT_LOADED", "the NVIDIA kernel driver is not loaded"),
        ("LIB_RM_VERSION_MISMATCH", "reboot"),
        ("UNKNOWN", r"NVML failed in nvmlInit: Unknown Error"),
    ],
)
def test_nvml_that_cannot_start_raises_nvml_unavailable(init_error: str, message: str) -> None:
    nvml = FakeNvml({"init_error": init_error, "devices": []})
    with pytest.raises(NvmlUnavailable, match=message):
        discover(nvml=nvml)
    assert isinstance(NvmlUnavailable("x"), RuntimeError)


def test_nvml_is_shut_down_even_when_counting_fails() -> None:
    nvml = FakeNvml({"count_error": "GPU_IS_LOST", "devices": []})
    with pytest.raises(NvmlUnavailable, match="NVML failed in nvmlDeviceGetCount: GPU is lost"):
        discover(nvml=nvml)
    assert (nvml.init_count, nvml.shutdown_count, nvml.initialized) == (1, 1, False)
    ok = FakeNvml.from_fixture("2x-rtx-4090")
    discover(nvml=ok)
    assert (ok.init_count, ok.shutdown_count, ok.initialized) == (1, 1, False)


def test_no_gpus_is_an_empty_inventory() -> None:
    assert discover(nvml=FakeNvml({"driver_version": "550.54.15", "devices": []})) == []


def test_missing_pynvml_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_pynvml(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    with pytest.raises(NvmlUnavailable, match=r"^the nvidia-ml-py package \(pynvml\) is not installed$"):
        discover()


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver")
def test_real_pynvml_without_a_driver() -> None:
    with pytest.raises(NvmlUnavailable, match=r"^no NVIDIA driver is installed \(libnvidia-ml.so.1 not found\)$"):
        discover()


@pytest.mark.skipif(ctypes.util.find_library("nvidia-ml") is not None, reason="this machine has an NVIDIA driver")
def test_command_line_without_a_driver() -> None:
    done = subprocess.run([sys.executable, "-m", "launcher.gpus.discovery"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip() == "gpus: no NVIDIA driver is installed (libnvidia-ml.so.1 not found)"


# --------------------------------------------------------------------------------- recordings and JSON


@pytest.mark.parametrize("name", fixture_names())
def test_recording_replays_exactly(name: str) -> None:
    """What the probe reads from the fake is the fixture: a `--record` from a real rig replays as recorded."""
    fixture = load_fixture(name)
    facts = read_facts(FakeNvml(copy.deepcopy(fixture)))
    assert {"description": fixture["description"], **facts} == fixture


def test_record_command_prints_a_fixture(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--record"], nvml=FakeNvml.from_fixture("4x-a6000")) == 0
    recorded = json.loads(capsys.readouterr().out)
    replayed = discover(nvml=FakeNvml(recorded))
    assert replayed == _discover("4x-a6000")


@pytest.mark.parametrize("name", fixture_names())
def test_inventory_json_round_trip(name: str) -> None:
    gpus = _discover(name)
    rows = json.loads(json.dumps(inventory_to_json(gpus)))
    assert inventory_from_json(rows) == gpus


def test_simulated_inventory_json_round_trip() -> None:
    gpus = simulated_inventory([SimGpu(name="RTX 4090"), SimGpu(name="RTX 3090", vram_gb=20, uuid="GPU-custom")])
    assert inventory_from_json(json.loads(json.dumps(inventory_to_json(gpus)))) == gpus
    assert inventory_to_json(gpus)[1]["uuid"] == "GPU-custom"


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (["nope"], r"gpus\[0\]: expected an object"),
        ([{"index": 0}], r"gpus\[0\]: missing uuid, name"),
        ([{"bogus": 1}], r"gpus\[0\]: unknown keys bogus"),
    ],
)
def test_inventory_from_json_rejects_bad_rows(rows: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        inventory_from_json(rows)


def test_inventory_from_json_names_a_bad_card() -> None:
    row = inventory_to_json(_discover("1x-h100-80g"))[0]
    del row["card"]["mem_bw_gbps"]
    with pytest.raises(ValueError, match=r"gpus\[0\]\.card: missing 'mem_bw_gbps'"):
        inventory_from_json([row])
    row = inventory_to_json(_discover("1x-h100-80g"))[0]
    row["compute_capability"] = [9]
    with pytest.raises(ValueError, match=r"gpus\[0\]\.compute_capability: expected \[major, minor\]"):
        inventory_from_json([row])


def test_command_line_table_and_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--visible-devices", "1,0"], nvml=FakeNvml.from_fixture("rtx-4090-rtx-3090")) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["#", "name"]
    assert table[1].startswith("1  NVIDIA GeForce RTX 3090")
    assert table[2].startswith("0  NVIDIA GeForce RTX 4090")

    assert main(["--json"], nvml=FakeNvml.from_fixture("partial-nvml")) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [row["index"] for row in rows] == [0, 1, 3]
    assert rows[0]["extra"]["card_spec"] == "nvml"

    assert main(["--visible-devices", ""], nvml=FakeNvml.from_fixture("2x-rtx-4090")) == 0
    assert capsys.readouterr().out.strip() == "no GPU visible (CUDA_VISIBLE_DEVICES='')"
