"""`corral plan` as a user runs it (a child process on config files), and the rig resolution behind it."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from launcher.commands.plan import print_plan
from launcher.commands.rig import Rig, model_specs, resolve_rig, sim_argv
from launcher.config import CorralConfig, LauncherSettings, ModelEntry, SimGpu, load_config
from launcher.facts.catalog import find_model
from launcher.facts.strictconf import ConfigError
from launcher.gpus.discovery import GpuInfo, NvmlUnavailable, simulated_inventory
from launcher.planner.plan import ModelRequest, plan

ROOT = Path(__file__).resolve().parents[2]
SIM_RIG = "[sim]\n[[sim.gpus]]\nname = 'RTX 4090'\n[[sim.gpus]]\nname = 'RTX 4090'\n"


def _corral_plan(config: Path, *args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    # PATH without `ollama`, so ollama_bin = "auto" means the simulated rig wherever the test runs.
    empty = tmp_path / "bin"
    empty.mkdir(exist_ok=True)
    env = {**os.environ, "PATH": str(empty)}
    return subprocess.run(
        [sys.executable, "-m", "launcher.commands.cli", "plan", "--config", str(config), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=60,
    )


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "rig.toml"
    path.write_text(text)
    return path


def test_the_example_config_prints_the_rig_the_cards_and_the_reasons(tmp_path: Path) -> None:
    proc = _corral_plan(ROOT / "config.toml", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == (
        "rig: no `ollama` on PATH: running the simulated rig from config.toml [sim]: 2x RTX 4090, 2x RTX 3090"
    )
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["CARD"])
    card_rows = {line.split()[0]: line for line in lines[header + 1 : lines.index("", header)]}
    assert list(card_rows) == ["g0", "g1", "g2", "g3"]
    # PLANNED / FREE: free is what stays free after the plan, so the two add up to the card's 24 GiB.
    planned, free = (float(x) for x in card_rows["g0"].split()[3:6:2])
    assert planned + free == pytest.approx(24.0, abs=0.11) and "11500" in card_rows["g0"]
    assert "g2+g3 (split)  11502  llama3.3:70b" in card_rows["g2"]
    assert "g2+g3 (split)  11502  llama3.3:70b" in card_rows["g3"]
    assert any("llama3.1:8b" in line and "hot model: a card of its own (RTX 4090" in line for line in lines)
    assert any("llama3.3:70b" in line and "split over 2 cards: no single card holds it" in line for line in lines)
    why_not = lines[lines.index("why not elsewhere:") + 1 :]
    assert any(
        "llama3.1:8b" in line and "g2 (RTX 3090):" in line and "no room for qwen2.5:7b" in line for line in why_not
    )
    # The split shows the layers llama.cpp gives each card (81 = 80 layers + the output layer).
    split = next(line for line in lines if "llama3.3:70b" in line and "GiB (" in line)
    left, right = split.split("GiB (")[1].split(" layers")[0].split("+")
    assert int(left) + int(right) == 81
    assert "summary:" in lines
    assert proc.stderr == ""


def test_json_has_the_whole_plan_and_the_rig(tmp_path: Path) -> None:
    proc = _corral_plan(ROOT / "config.toml", "--json", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["rig"]["mode"] == "sim"
    assert data["rig"]["ollama_bin"][1:] == ["-m", "launcher.sim.cli", "serve"]
    assert [g["name"] for g in data["rig"]["gpus"]] == ["RTX 4090", "RTX 4090", "RTX 3090", "RTX 3090"]
    plan = data["plan"]
    assert plan["ok"] is True and plan["errors"] == []
    split = next(b for b in plan["backends"] if b["id"] == "g2+g3")
    assert split["kind"] == "split" and split["gpu_indices"] == [2, 3] and split["port"] == 11502
    (model,) = split["models"]
    assert model["name"] == "llama3.3:70b" and model["num_ctx"] == 8192 and model["num_gpu"] == -1
    assert len(model["card_vram_bytes"]) == 2 and model["expected_tokens_per_s"] > 0
    assert set(plan["notes"]) == {"llama3.1:8b", "qwen2.5:7b", "nomic-embed-text:latest", "llama3.3:70b"}
    assert all({"model", "candidate", "reason"} == set(r) for r in plan["rejections"])


def test_a_model_that_fits_nowhere_exits_1_with_the_error_on_stderr(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "[launcher]\nollama_bin = 'sim'\nallow_cpu_offload = false\n"
        "[[models]]\nname = 'llama3.1:405b'\n[[models]]\nname = 'llama3.2:3b'\n" + SIM_RIG,
    )
    proc = _corral_plan(config, tmp_path=tmp_path)
    assert proc.returncode == 1
    assert proc.stdout.startswith('rig: launcher.ollama_bin = "sim": running the simulated rig from rig.toml [sim]')
    assert "llama3.2:3b" in proc.stdout, "what does fit is still shown"
    (error,) = proc.stderr.splitlines()
    assert error.startswith("error: llama3.1:405b: too large for this rig: needs ")
    assert "short by" in error
    as_json = _corral_plan(config, "--json", tmp_path=tmp_path)
    assert as_json.returncode == 1 and json.loads(as_json.stdout)["plan"]["ok"] is False


def test_cpu_offload_is_a_warning_in_the_table(tmp_path: Path) -> None:
    config = _config(tmp_path, "[launcher]\nollama_bin = 'sim'\n[[models]]\nname = 'llama3.1:405b'\n" + SIM_RIG)
    proc = _corral_plan(config, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "g0+g1 (cpu)" in proc.stdout
    warnings = proc.stdout.split("warnings:\n", 1)[1]
    assert warnings.startswith("  - llama3.1:405b runs partly on the CPU: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[models]]\nname = 'nosuch:1b'\n" + SIM_RIG, "models[0].name: model 'nosuch:1b' not found ("),
        ("[launcher]\nollama_bin = 'sim'\n", 'sim.gpus: launcher.ollama_bin = "sim", and there is no simulated rig'),
        ("[launcher]\nrequire_gpus = true\n" + SIM_RIG, "launcher.require_gpus: is true, but no `ollama` on PATH"),
        ("[launcher]\nollama_bin = '/nonexistent/ollama'\n", "launcher.ollama_bin: '/nonexistent/ollama' is not an"),
    ],
)
def test_rig_and_model_problems_are_one_line_and_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    proc = _corral_plan(_config(tmp_path, text), tmp_path=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1


# -- rig resolution, with the PATH and NVML seams -------------------------------------------------


def _real(gpus: list[GpuInfo]) -> list[GpuInfo]:
    return [replace(g, simulated=False, uuid=f"GPU-real-{g.index}") for g in gpus]


def _cfg(tmp_path: Path, launcher: str = "", sim: str = SIM_RIG) -> CorralConfig:
    return load_config(_config(tmp_path, f"[launcher]\n{launcher}\n{sim}"))


def test_auto_uses_the_real_rig_when_ollama_and_gpus_are_there(tmp_path: Path) -> None:
    found = _real(simulated_inventory([SimGpu(name="H100"), SimGpu(name="H100")]))
    rig = resolve_rig(_cfg(tmp_path), discover=lambda: found, which=lambda name: f"/opt/{name}")
    assert rig.mode == "real" and rig.gpus == found
    assert rig.ollama_bin == ["/opt/ollama", "serve"]
    assert rig.message == "ollama at /opt/ollama on 2 GPU(s): 2x H100 80GB"


def test_auto_falls_back_to_the_simulated_rig_and_says_why(tmp_path: Path) -> None:
    def no_nvml() -> list[GpuInfo]:
        raise NvmlUnavailable("NVML is not available: no NVIDIA driver is installed")

    rig = resolve_rig(_cfg(tmp_path), discover=no_nvml, which=lambda name: f"/opt/{name}")
    assert rig.mode == "sim" and rig.ollama_bin == sim_argv()
    assert rig.message == (
        "no NVIDIA GPU found (NVML: NVML is not available: no NVIDIA driver is installed): "
        "running the simulated rig from rig.toml [sim]: 2x RTX 4090"
    )
    assert [g.simulated for g in rig.gpus] == [True, True]
    rig = resolve_rig(_cfg(tmp_path), discover=list, which=lambda name: f"/opt/{name}")
    assert rig.message.startswith("no NVIDIA GPU found (NVML sees none): running the simulated rig")


def test_require_gpus_refuses_the_fallback(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=r"launcher.require_gpus: is true, but no NVIDIA GPU found \(NVML sees none\)"
    ):
        resolve_rig(_cfg(tmp_path, "require_gpus = true"), discover=list, which=lambda name: f"/opt/{name}")


def test_an_explicit_ollama_path_is_the_real_rig_even_without_gpus(tmp_path: Path) -> None:
    ollama = tmp_path / "ollama"
    ollama.write_text("#!/bin/sh\n")
    ollama.chmod(ollama.stat().st_mode | stat.S_IXUSR)
    rig = resolve_rig(_cfg(tmp_path, f"ollama_bin = '{ollama}'"), discover=list)
    assert rig.mode == "real" and rig.gpus == [] and rig.ollama_bin == [str(ollama), "serve"]
    assert rig.message == f"no NVIDIA GPU found (NVML sees none): ollama at {ollama} runs on the CPU"
    ollama.chmod(0o644)
    with pytest.raises(ConfigError, match="is not an executable file"):
        resolve_rig(_cfg(tmp_path, f"ollama_bin = '{ollama}'"), discover=list)


def test_model_specs_resolve_aliases_and_name_unknown_models(tmp_path: Path) -> None:
    cfg = load_config(_config(tmp_path, "[[models]]\nname = 'nomic-embed-text'\n[[models]]\nname = 'llama3.3'\n"))
    requests = model_specs(cfg)
    assert [(r.name, r.spec.name, r.index) for r in requests] == [
        ("nomic-embed-text:latest", "nomic-embed-text:v1.5", 0),
        ("llama3.3:latest", "llama3.3:70b", 1),
    ]
    cfg = load_config(_config(tmp_path, "[[models]]\nname = 'llama3.1:8b'\n[[models]]\nname = 'mystery:7b'\n"))
    with pytest.raises(ConfigError, match=r"models\[1\].name: model 'mystery:7b' not found \(.*catalog"):
        model_specs(cfg)


def test_the_operators_cuda_visible_devices_limits_the_rig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # NVML is the one thing faked: a recorded 2x RTX 4090 box, of which the operator hands Corral GPU 1.
    from launcher.gpus import discovery as gpus
    from tests.support.fakenvml import FakeNvml, load_fixture

    fake = FakeNvml(load_fixture("2x-rtx-4090"))
    monkeypatch.setattr(gpus, "load_nvml", lambda: fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    rig = resolve_rig(_cfg(tmp_path), which=lambda name: f"/opt/{name}")
    assert rig.mode == "real"
    assert [g.index for g in rig.gpus] == [1]


def test_the_card_table_names_mig_instances_as_their_backends_do() -> None:
    (whole,) = simulated_inventory([SimGpu(name="A100 80GB")])
    half = 40 * 1024**3
    instances = [
        replace(whole, uuid=f"MIG-{n}", memory_total_bytes=half, memory_free_bytes=half, mig_parent_uuid=whole.uuid)
        for n in range(2)
    ]
    spec = find_model("llama3.1:8b")
    assert spec is not None
    the_plan = plan(instances, [ModelRequest(ModelEntry("llama3.1:8b", num_ctx=8192), spec)], LauncherSettings())
    out = io.StringIO()
    print_plan(the_plan, Rig(instances, "sim", [], "2 MIG instances"), out)
    lines = out.getvalue().splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["CARD"])
    rows = [line.split() for line in lines[header + 1 : lines.index("", header)]]
    # CARD (tag, name), PLANNED / FREE, BACKEND, PORT, MODELS
    assert [(row[0], row[-3]) for row in rows] == [("g0.0", "g0.0"), ("g0.1", "g0.1")]


# -- the Ollama version decides the memory model -------------------------------------------------


def _fake_ollama(tmp_path: Path, script: str) -> Path:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / "ollama"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def _plan_on_real_rig(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], script: str, models: str
) -> str:
    from launcher.commands import plan as plan_cmd
    from launcher.gpus import discovery as gpus
    from tests.support.fakenvml import FakeNvml, load_fixture

    fake = FakeNvml(load_fixture("2x-rtx-4090"))
    monkeypatch.setattr(gpus, "load_nvml", lambda: fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setenv("PATH", str(_fake_ollama(tmp_path, script)))
    config = _config(tmp_path, models)
    code = plan_cmd.run(plan_cmd.argparse.Namespace(config=str(config), json=False))
    out = capsys.readouterr().out
    assert code == 0, out
    return out


SEED_70B = "[[models]]\nname = 'llama3.3:70b'\nnum_ctx = 8192\n"


def test_a_real_rig_plans_with_the_memory_model_of_its_ollama_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _plan_on_real_rig(tmp_path, monkeypatch, capsys, "echo 'ollama version is 0.12.10'\n", SEED_70B)
    assert "memory model: Ollama 0.12.10: Ollama <= 0.29 (GraphSize estimate" in out
    out = _plan_on_real_rig(tmp_path, monkeypatch, capsys, "echo 'ollama version is 0.33.0'\n", SEED_70B)
    assert "memory model: Ollama 0.33.0: Ollama >= 0.30 (llm.PredictServerVRAM + llama-server --fit)" in out
    assert "warning:" not in out.split("\n\n")[0]


def test_an_unreadable_version_plans_with_heads_model_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _plan_on_real_rig(tmp_path, monkeypatch, capsys, "echo 'segfault' >&2; exit 3\n", SEED_70B)
    head = out.split("\n\n")[0]
    assert "memory model: unknown Ollama version: Ollama >= 0.30" in head
    assert "--version` failed (no version in its output: 'segfault'); planning with HEAD's memory model" in head


def test_the_seeds_70b_on_a_real_2x_rtx_4090_is_split_over_both_cards_at_the_seeds_rate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # shared/seeds/001: 22.6 tokens/s with the 70B split over both 4090s. No num_parallel on the
    # model, so the launcher's 4 slots are stepped down until it fits on the GPUs.
    out = _plan_on_real_rig(tmp_path, monkeypatch, capsys, "echo 'ollama version is 0.33.0'\n", SEED_70B)
    row = next(line for line in out.splitlines() if "llama3.3:70b" in line and "GiB (" in line)
    cells = row.split()
    assert cells[0] == "g0+g1" and "(split)" not in cells
    tps = float(cells[cells.index("layers)") + 1])
    assert tps == pytest.approx(22.6, rel=0.15)
    assert "num_parallel" in row and "stepped down from 4" in row
    assert "CPU" not in out.split("summary:")[0].split("why not elsewhere:")[0]
